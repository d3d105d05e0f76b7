"""PPO's metrics: one flat dict of namespaced keys per step (TRL's PPOTrainer names), and the run's summary.

    objective/   score, toxicity, KL (k1 and k3), coefficients, the RLHF reward they add up to,
                 reward/<name>: each component's mean raw value (rlhf.ppo.rewards)
    policy/      approxkl, clipfrac, entropy of the update        loss/  policy loss (and KL loss term)
    val/         value loss, its clip fraction, explained variance (with a critic only)
    response/    length, EOS rate          timing/  rollout and update seconds, episodes_per_s

`step_metrics` builds a step's dict; `run_summary` the entry's final metrics from every step's;
`training_flags` what in the run's course looks like trouble (reward hacking's usual signs).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from rlhf.errors import UserError


def step_metrics(step: int, batch_size: int, *, score: Tensor, toxicity: Tensor, total: Tensor, logprobs: Tensor,
                 ref_logprobs: Tensor, kl: Tensor, mask: Tensor, values: Tensor | None, returns: Tensor | None,
                 has_eos: Tensor, kl_coef: float, toxicity_coef: float, update: dict[str, float], rollout_s: float,
                 update_s: float, components: dict[str, Tensor] | None = None) -> dict[str, float]:
    """The metrics of step `step` (1-based) of `batch_size` episodes (global) from its rollout's tensors (B,) /
    (B, R) and `update`'s statistics; `kl` is the penalty's estimate, the one β multiplies; `values` and `returns`
    None without a critic; `components` the reward's, by name (NaN where a function returned None)."""
    from rlhf.ppo.losses import explained_variance, kl_k1, kl_k3

    m = mask.to(kl.dtype)  # (B, R)
    out = {
        "step": step, "episodes": step * batch_size,
        "objective/score": score.mean().item(), "objective/toxicity": toxicity.mean().item(),
        "objective/kl": (kl_k1(logprobs, ref_logprobs) * m).sum(1).mean().item(),
        "objective/kl_k3": (kl_k3(logprobs, ref_logprobs) * m).sum(1).mean().item(),
        "objective/kl_coef": kl_coef, "objective/toxicity_coef": toxicity_coef,
        "objective/rlhf_reward": (total - kl_coef * (kl * m).sum(1)).mean().item(),
        "policy/approxkl": update["approxkl"], "policy/clipfrac": update["clipfrac"],
        "policy/entropy": update["entropy"], "loss/policy": update["pg_loss"],
        "response/length_mean": mask.sum(1).float().mean().item(),
        "response/eos_rate": has_eos.float().mean().item(),
        "timing/rollout_s": rollout_s, "timing/update_s": update_s,
        "episodes_per_s": batch_size / (rollout_s + update_s),
    }
    if "kl_loss" in update:
        out["loss/kl"] = update["kl_loss"]
    if values is not None:
        out.update({"val/vf_loss": update["vf_loss"], "val/clipfrac": update["vf_clipfrac"],
                    "val/explained_variance": explained_variance(values, returns, mask)})
    for name, x in (components or {}).items():
        valid = ~x.isnan()
        out[f"objective/reward/{name}"] = x[valid].mean().item() if bool(valid.any()) else 0.0
    return out


def check_finite(metrics: dict[str, float], where: str) -> None:
    """Stop with a message when a metric is NaN or infinite (explained variance may be NaN: constant returns)."""
    bad = sorted(k for k, v in metrics.items() if k != "val/explained_variance" and not math.isfinite(v))
    if bad:
        raise UserError(f"step {int(metrics['step'])}: non-finite {', '.join(bad)}; stopping, last good checkpoint "
                        f"kept in {where}; try a lower learning_rate")


def run_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """The entry's metrics: the last step's namespaced ones, score and toxicity over the first and last quarter
    of the steps (a quarter of at least one step), and the number of steps."""
    import numpy as np

    quarter = max(1, len(history) // 4)
    first, last = history[:quarter], history[-quarter:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    final = {k: v for k, v in history[-1].items() if "/" in k}
    final.update({
        "score_first_quarter": mean(first, "objective/score"), "score_last_quarter": mean(last, "objective/score"),
        "toxicity_first_quarter": mean(first, "objective/toxicity"),
        "toxicity_last_quarter": mean(last, "objective/toxicity"), "steps": history[-1]["step"],
    })
    return final


def _slope(ys: list[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ..."""
    import numpy as np

    return float(np.polyfit(np.arange(len(ys)), np.asarray(ys, dtype=float), 1)[0]) if len(ys) > 1 else 0.0


def training_flags(history: list[dict[str, Any]], *, kl_factor: float = 2.0, entropy_factor: float = 0.5) -> list[str]:
    """Warnings about the run's course (OpenRLHF #1263's list), each one line; [] when nothing stands out or the
    run is shorter than 8 steps:

        KL accelerating     the KL's slope over the second half of the steps is more than `kl_factor` times its
                            slope over the first half (and rising): the policy is leaving the reference faster
                            and faster, the usual start of over-optimization
        entropy collapsing  the policy's entropy over the last quarter is below `entropy_factor` times the first
                            quarter's: it is becoming deterministic, so sampling stops exploring
    """
    import numpy as np

    if len(history) < 8:
        return []
    flags = []
    kl = [r["objective/kl"] for r in history]
    half = len(kl) // 2
    first, second = _slope(kl[:half]), _slope(kl[half:])
    if second > 0 and second > kl_factor * max(first, 0.0):
        flags.append(f"KL accelerating: {first:+.3f}/step over the first half of the steps, {second:+.3f}/step over "
                     f"the second (final KL {kl[-1]:.2f})")
    ent = [r["policy/entropy"] for r in history if "policy/entropy" in r]
    if len(ent) >= 8:
        q = len(ent) // 4
        a, b = float(np.mean(ent[:q])), float(np.mean(ent[-q:]))
        if b < entropy_factor * a:
            flags.append(f"entropy collapsing: {a:.3f} over the first quarter of the steps, {b:.3f} over the last")
    return flags
