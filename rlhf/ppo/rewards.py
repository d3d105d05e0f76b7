"""From a rollout's scores to PPO's targets: the reward of each response, per-token rewards, advantages.

    sequence_rewards(...)   per response: score = (RM − reward_mean)/reward_std,
                            total = score − toxicity_coef·toxicity − missing_eos_penalty·[no EOS]
    gae_targets(...)        per token: rewards = −β·KL, plus `total` at the last real token;
                            GAE advantages (whitened over every process) and returns

Pure functions on tensors and floats (the symbols of `rlhf.ppo.losses`); the stage calls them in
this order every step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class SequenceRewards:
    """What each response earned, before the per-token KL penalty."""

    score: Tensor  # (B,) normalized RM score
    toxicity: Tensor  # (B,) toxicity scorer's value in [0, 1]
    total: Tensor  # (B,) score − toxicity_coef·toxicity − missing_eos_penalty·[no EOS]


def sequence_rewards(rm_scores: Tensor, toxicity: Tensor, has_eos: Tensor, *, reward_mean: float, reward_std: float,
                     toxicity_coef: float, missing_eos_penalty: float) -> SequenceRewards:
    """The reward of each whole response (see the module docstring); `reward_mean` / `reward_std` are the reward
    entry's statistics on its training data, so a score of 0 is an average response there."""
    score = (rm_scores.float() - reward_mean) / reward_std  # (B,)
    toxicity = toxicity.to(score.device, score.dtype)  # (B,)
    total = score - toxicity_coef * toxicity - missing_eos_penalty * (~has_eos.bool()).to(score.dtype)  # (B,)
    return SequenceRewards(score=score, toxicity=toxicity, total=total)


@dataclass
class Targets:
    """Per-token quantities of one rollout, all (B, R) and 0 on pads."""

    kl: Tensor  # KL estimate (kl_estimator) between policy and reference
    rewards: Tensor  # −β·kl, plus the response's total at its last real token
    advantages: Tensor  # GAE, whitened over the real tokens of every process
    returns: Tensor  # value targets: advantages (before whitening) + values


def gae_targets(total: Tensor, logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, mask: Tensor, *,
                kl_coef: float, kl_estimator: str, gamma: float, lam: float, whiten_rewards: bool,
                world_size: int) -> Targets:
    """Per-token rewards, GAE advantages and returns (see `rlhf.ppo.losses.compute_gae`)."""
    from rlhf.ppo.distributed import global_whiten
    from rlhf.ppo.losses import compute_gae, kl_penalty, masked_whiten, per_token_rewards

    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)  # (B, R)
    rewards = per_token_rewards(total, kl, kl_coef, mask)  # (B, R)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    return Targets(kl=kl, rewards=rewards, advantages=global_whiten(advantages, mask, world_size), returns=returns)
