"""Advantage estimators: GAE with a critic (`rlhf.ppo.losses.compute_gae`) and the critic-free ones.

    advantage_estimator   advantage of response i of a prompt's group of k (num_generations)
    gae                   per token, from a critic's values (Schulman et al. 2016)
    grpo                  (s_i − mean_g) / (std_g + 1e-4)                    per response (Shao et al. 2024)
    dr_grpo               s_i − mean_g                                       per response (Liu et al. 2025)
    rloo                  s_i − mean_{j≠i} s_j = k/(k−1)·(s_i − mean_g)      per response (Ahmadian et al. 2024)
    reinforce_pp          G_t = Σ_{t'≥t} γ^{t'−t} r_t', whitened over the global batch    per token (Hu 2025)
    reinforce_baseline    as reinforce_pp with s_i − mean_g in place of s_i, divided by the global std only

`s` is each response's scalar reward; `r_t` the per-token rewards (−β·KL on every token, plus s at the
last real token) when the KL is in the reward. A group is k consecutive rows sampled from one prompt, and
always lies on one process; the global statistics of REINFORCE++ cover every process.
Pure functions on tensors: (B,) scores or (B, T) per-token rewards and the response mask, as in
`rlhf.ppo.losses`; a per-response advantage is put on every real token of its response by the caller
(`rlhf.ppo.rewards.critic_free_targets`).
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_baseline")
# Compare a prompt's responses with each other: they need num_generations >= 2.
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
# Advantages per token from per-token rewards (the rest: one advantage per response).
TOKEN_ESTIMATORS = ("gae", "reinforce_pp", "reinforce_baseline")
GRPO_STD_EPS = 1e-4  # TRL GRPOTrainer's: a group of equal rewards gets advantage 0, not 0/0


def _groups(scores: Tensor, k: int) -> Tensor:
    """(B,) -> (B/k, k): the rows of each prompt's group (k consecutive rows)."""
    if scores.ndim != 1 or k < 1 or scores.shape[0] % k:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not form whole groups of {k}")
    return scores.float().view(-1, k)


def group_mean_baseline(scores: Tensor, k: int) -> Tensor:
    """(B,) s_i − mean of its group (Dr. GRPO's advantage; REINFORCE++-baseline's reward)."""
    g = _groups(scores, k)
    return (g - g.mean(dim=1, keepdim=True)).flatten()


def grpo_advantages(scores: Tensor, k: int, eps: float = GRPO_STD_EPS) -> Tensor:
    """(B,) GRPO: (s_i − mean_g) / (std_g + eps), std with Bessel's correction as in DeepSeekMath (Shao et al.
    2024, "DeepSeekMath", §4.1.2) and TRL's GRPOTrainer."""
    if k < 2:
        raise ValueError("GRPO needs groups of at least 2 responses")
    g = _groups(scores, k)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).flatten()


def dr_grpo_advantages(scores: Tensor, k: int) -> Tensor:
    """(B,) Dr. GRPO: s_i − mean_g. Without GRPO's division by the group's std, which weights prompts whose
    responses score alike (too easy or too hard) more (Liu et al. 2025, "Understanding R1-Zero-Like Training");
    its other half, the length-unbiased loss, is `loss_type: dr_grpo` (`rlhf.ppo.losses.aggregate_loss`)."""
    if k < 2:
        raise ValueError("Dr. GRPO needs groups of at least 2 responses")
    return group_mean_baseline(scores, k)


def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """(B,) RLOO: s_i − (Σ_{j≠i} s_j)/(k−1), the mean of the other k−1 responses to the same prompt as the
    baseline, which is independent of s_i (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE
    Style Optimization for Learning from Human Feedback in LLMs")."""
    if k < 2:
        raise ValueError("RLOO needs groups of at least 2 responses")
    g = _groups(scores, k)
    return (g - (g.sum(dim=1, keepdim=True) - g) / (k - 1)).flatten()


@torch.no_grad()
def cumulative_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """(B, T) G_t = Σ_{t'≥t} γ^{t'−t} r_t' over each row's real tokens (0 at pads); GAE with V = 0 and λ = 1."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


@torch.no_grad()
def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float, world_size: int,
                            shift_mean: bool = True) -> Tensor:
    """(B, T) REINFORCE++: the returns G_t of `rewards` normalized over the real tokens of the global batch
    (every process), which stands in for PPO's critic as the baseline and the scale (Hu 2025, "REINFORCE++:
    A Simple and Efficient Approach for Aligning Large Language Models"). `shift_mean=False` (the
    REINFORCE++-baseline variant, whose rewards are already centered per group) divides by the std only."""
    from rlhf.ppo.distributed import global_mean_var, global_whiten

    returns = cumulative_returns(rewards, mask, gamma)
    if shift_mean:
        return global_whiten(returns, mask, world_size)
    _, var = global_mean_var(returns, mask, world_size)
    return returns * torch.rsqrt(var + 1e-8) * mask.to(returns.dtype)
