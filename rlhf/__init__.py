"""rlhf: SFT -> reward model -> PPO on one 4-bit base, sharing one checkpoint registry.

Importing this package is cheap: torch, transformers, detoxify and friends are
imported inside the functions that need them.
"""

__version__ = "0.1.0"
