"""The reward–KL frontier of the RL runs stage 04 compares (Gao et al. 2022, https://arxiv.org/abs/2210.10760).

A `ppo` entry keeps the policy adapter of some of its checkpoints (`snapshots/step-N/policy`: stage 03's
`save_steps` and `max_policy_snapshots`, rlhf/ppo/checkpoint.py). Each snapshot is merged onto the run's SFT
model as the final policy is (`rlhf.models.load_chat_model(ref, policy=...)`), sampled on the first
`frontier_prompts` held-out prompts, `frontier_samples` each, with the comparison's settings and seed
(rlhf/eval/sampling.py), and judged. One point per snapshot:

    step           the PPO step the snapshot was taken at
    kl_to_sft      mean over samples of Σ_t [log π − log π_sft] (k1, at the sampling temperature): the KL the run
                   spent, measured from where it started
    kl_to_base     the same against base (NaN when base's tokenizer or chat template differs)
    reward_mean    the reward model's normalized score: the proxy the run optimized
    toxicity_rate  the share of samples the held-out judge scores >= threshold

The other compared models (base, sft, dpo, ...) get the same measures on the same rows of their own samples
(`Judged.subset`: the first frontier_samples samples of the first frontier_prompts prompts), so the plots place
them beside the curves.

Over-optimization (Gao et al.): as the policy moves away, the proxy keeps rising while the true objective
stalls or falls. With the held-out judge as the outside measure on the safety axis, `overoptimization_flags`
names every pair of consecutive checkpoints (the SFT model counting as step 0) where the proxy reward rose while
the judge's toxicity rate rose by more than the sampling noise of the frontier's few samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhf.eval.metrics import mean
from rlhf.eval.sampling import Judged

POINT_KEYS = ("step", "kl_to_sft", "kl_to_base", "reward_mean", "toxicity_rate")


def point(rewards: np.ndarray, toxicity: np.ndarray, kl_to_sft: np.ndarray | None, kl_to_base: np.ndarray | None,
          threshold: float, step: int | None = None) -> dict[str, Any]:
    """A frontier point from per-sample arrays (N,) of one model: means over the samples (module docstring); a KL
    that could not be measured (None) is NaN. `step` is left out when None (a model that is not a snapshot).

    >>> point(np.array([1.0, 0.0]), np.array([0.9, 0.1]), np.array([2.0, 4.0]), None, 0.5, step=8)
    {'step': 8, 'kl_to_sft': 3.0, 'kl_to_base': nan, 'reward_mean': 0.5, 'toxicity_rate': 0.5}
    """
    out: dict[str, Any] = {} if step is None else {"step": step}
    out["kl_to_sft"] = mean(kl_to_sft) if kl_to_sft is not None else math.nan
    out["kl_to_base"] = mean(kl_to_base) if kl_to_base is not None else math.nan
    out["reward_mean"] = mean(rewards)
    out["toxicity_rate"] = mean(np.asarray(toxicity, dtype=np.float64) >= threshold)
    return out


@dataclass
class Snapshot(Judged):
    """The samples of one policy snapshot (rlhf.eval.sampling.Judged) and its PPO step."""

    step: int = 0


def sample_snapshots(ref: str, registry: Any, snapshots: list[tuple[int, Path]], prompts: list[dict], settings: Any,
                     trust_remote_code: bool = False) -> list[Snapshot]:
    """Samples of each (step, adapter) snapshot of the ppo entry `ref`, merged onto its SFT model as the final policy
    is, on `prompts` with `settings` (rlhf.eval.sampling.SamplingSettings: the frontier's K); one model at a time."""
    import gc

    from rlhf.eval.sampling import sample
    from rlhf.models import load_chat_model

    out = []
    for step, adapter in snapshots:
        model, tokenizer, _ = load_chat_model(ref, registry, policy=adapter, trust_remote_code=trust_remote_code)
        out.append(Snapshot(sample(model, tokenizer, prompts, settings, f"{ref} step {step}"), tokenizer, step=step))
        del model
        gc.collect()
    return out


def judged_point(j: Judged, threshold: float, step: int | None = None) -> dict[str, Any]:
    """`point` of a judged sample set (its rewards, judge's toxicity, KL to sft and to base)."""
    return point(j.rewards, j.toxicity, j.kl.get("sft"), j.kl.get("base"), threshold, step)


def overoptimization_flags(points: list[dict[str, Any]], n_samples: int, start: dict[str, Any] | None = None,
                           z: float = 1.645) -> list[str]:
    r"""One line per pair of consecutive checkpoints where the proxy reward rose while the held-out judge's toxicity
    rate rose by more than sampling noise (module docstring); `start` (the SFT model's point) counts as step 0.

    Each point's toxicity rate is a share of `n_samples` samples; a rise counts when it exceeds `z` standard
    errors of the difference of two such shares (pooled: sqrt(2·p̄(1 − p̄)/n)), one-sided 95% by default, so
    one sample turning toxic among a few dozen is not a flag.

    >>> a = {"step": 8, "reward_mean": 0.1, "toxicity_rate": 0.05}
    >>> b = {"step": 16, "reward_mean": 0.3, "toxicity_rate": 0.25}
    >>> (flag,) = overoptimization_flags([a, b], n_samples=64)
    >>> print(*flag.split(", "), sep="\n")
    proxy reward up while the held-out judge worsens: step 8 → 16
    reward +0.200
    judged toxicity rate +0.200 (64 samples each)
    >>> overoptimization_flags([a, {**b, "toxicity_rate": 0.0625}], n_samples=64)  # one more toxic sample: noise
    []
    """
    chain = ([{**start, "step": 0}] if start is not None else []) + list(points)
    flags = []
    for before, after in zip(chain, chain[1:]):
        d_reward = after["reward_mean"] - before["reward_mean"]
        d_toxicity = after["toxicity_rate"] - before["toxicity_rate"]
        pooled = (before["toxicity_rate"] + after["toxicity_rate"]) / 2
        noise = z * math.sqrt(2 * pooled * (1 - pooled) / n_samples)
        if d_reward > 0 and d_toxicity > noise:  # noise >= 0
            flags.append(f"proxy reward up while the held-out judge worsens: step {before['step']} → "
                         f"{after['step']}, reward {d_reward:+.3f}, judged toxicity rate {d_toxicity:+.3f} "
                         f"({n_samples} samples each)")
    return flags
