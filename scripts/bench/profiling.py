"""Where our time goes: cumulative seconds of named functions of the PPO loop in a cProfile file.

A function is named by the end of its file's path and its name; the model forward (`_mixed_hidden`) is read
once under each caller, so the rollout's and the update's forwards are told apart.
"""

from __future__ import annotations

import pstats
from pathlib import Path
from typing import Any

from .stats import ratio

PROFILED = {  # name: (file suffix, function name[, caller function name])
    "rollout": ("rlhf/ppo/rollout.py", "rollout"),
    "rollout/generate": ("rlhf/ppo/actor_critic.py", "generate"),
    "rollout/ref_value_reward": ("rlhf/ppo/actor_critic.py", "rollout_forward"),  # one forward for the three roles
    "rollout/ref_value_reward/model": ("rlhf/ppo/actor_critic.py", "_mixed_hidden", "rollout_forward"),  # heads aside
    "decode_and_toxicity": ("rlhf/safety.py", "score"),
    "update": ("rlhf/ppo/update.py", "ppo_update"),
    "update/policy_value": ("rlhf/ppo/actor_critic.py", "update_forward"),  # one forward for both roles
    "update/policy_value/model": ("rlhf/ppo/actor_critic.py", "_mixed_hidden", "update_forward"),
    # The policy's forward alone: without a critic (critic-free estimators), or with fuse_roles off.
    "update/policy_value/model_policy_only": ("rlhf/ppo/actor_critic.py", "_forward", "policy_logits"),
    "update/backward": ("torch/_tensor.py", "backward"),
    "update/optimizer_step": ("torch/optim/adam.py", "step"),  # torch 2.13's AdamW is Adam's step
}


def profile_shares(path: Path) -> dict[str, dict[str, Any]]:
    """Cumulative seconds of the PROFILED functions in a cProfile file, and their share of rollout + update."""
    stats = pstats.Stats(str(path)).stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
    out: dict[str, float] = {}
    for name, (suffix, func, *caller) in PROFILED.items():
        total = 0.0
        for (file, _, fn), (_, _, _, ct, callers) in stats.items():
            if fn != func or not file.endswith(suffix):
                continue
            if caller:
                total += sum(c[3] for (cf, _, cfn), c in callers.items() if cfn == caller[0])
            else:
                total += ct
        out[name] = total
    loop = out["rollout"] + out["update"]
    return {"seconds": out, "share_of_loop": {k: ratio(v, loop) for k, v in out.items()}}
