"""The math of PPO for language models: pure, typed functions on tensors.

Nothing here knows about models, configs or processes: every function takes
tensors and floats and returns tensors (and, for the losses, a dict of detached
scalar statistics). `rlhf/ppo/rewards.py` and `update.py` compose them; `tests/test_ppo_math.py`
checks them against values worked out by hand.

Symbols (the same names mean the same thing in the stage script):

    B            number of responses in the batch (or minibatch, `mb_` prefix)
    T            response length in tokens (`response_length`); responses are
                 right-padded, so real tokens come first in every row
    V            vocabulary size
    mask         (B, T) 1 on real response tokens (EOS included), 0 on pads
    logprobs     (B, T) log π_θ(a_t | s_t) of the current policy
    old_logprobs (B, T) log π_θ_old(a_t | s_t), recorded at rollout time
    ref_logprobs (B, T) log π_ref(a_t | s_t) of the frozen reference model
    kl           (B, T) per-token KL estimate between policy and reference
    score        (B,)   scalar reward of each whole response (RM − toxicity term)
    rewards      (B, T) per-token rewards r_t: −β·kl_t, plus `score` at the last real token
    values       (B, T) V(s_t) from the value model
    advantages   (B, T) GAE estimates Â_t
    returns      (B, T) value targets R_t = Â_t + V(s_t)
    β            `kl_coef`, the KL penalty coefficient (fixed or adaptive)
    γ, λ         `gamma`, `lam`: discount and GAE parameter
    ε            `cliprange` (policy) and `cliprange_value` (value)

Logits must already be divided by the sampling temperature before they reach
`logprobs_from_logits` / `entropy_from_logits`, otherwise the KL is wrong.

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE),
http://joschu.net/blog/kl-approx.html (KL estimators). The adaptive β and the toxicity
multiplier are in `rlhf/ppo/controllers.py`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
LossType = Literal["dapo", "grpo", "dr_grpo"]
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")  # TRL GRPOConfig.loss_type's names, the ones that apply here


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is 1, over all entries (`dim=None`) or along `dim`.

    An empty mask (or an empty row along `dim`) gives 0 rather than NaN, so a loss over
    no tokens contributes nothing instead of poisoning the step.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the entries where `mask` is 1 (Bessel-corrected when `unbiased`).

    Raises ValueError when the mask holds too few entries (0, or 1 with `unbiased`),
    where the variance is undefined.
    """
    mask = mask.to(x.dtype)
    count = mask.sum()
    n = int(count.item())
    if n == 0 or (unbiased and n < 2):
        raise ValueError(
            f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}"
        )
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * count / (count - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalize the masked entries of `x` to variance 1 (and mean 0 when `shift_mean`).

    Statistics come from masked entries only; pad positions are returned unchanged.
    With `shift_mean=False` the mean is kept (used for rewards, whose sign matters).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, x)


# --------------------------------------------------------------------------- advantages


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over right-padded response tokens.

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t),   V = 0 after the last real token
        Â_t = δ_t + γλ·Â_{t+1}
        R_t = Â_t + V(s_t)

    Returns `(advantages, returns)`, both (B, T) and 0 at pad positions. Whatever
    `rewards` and `values` hold at pads is ignored. Runs without autograd: advantages
    and returns are targets, never differentiated through.
    """
    mask = mask.to(values.dtype)  # (B, T)
    values = values * mask  # (B, T) zero past the end: the bootstrap value there is 0
    rewards = rewards * mask  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        # On a pad, reward and value are 0 and so is every later Â: Â stays 0 there.
        next_advantage = delta + gamma * lam * next_advantage  # (B,)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages * mask  # (B, T)
    returns = advantages + values  # (B, T) values were masked above, so pads stay 0
    return advantages, returns


# --------------------------------------------------------------------------- KL and rewards


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(π_θ ‖ π_ref): log π_θ − log π_ref (unbiased, can be negative)."""
    return logprobs - ref_logprobs  # (B, T)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref): (r − 1) − log r with r = π_ref/π_θ.

    Unbiased under samples from π_θ, never negative, lower variance than k1.
    http://joschu.net/blog/kl-approx.html
    """
    log_ratio = ref_logprobs - logprobs  # (B, T) log r
    return torch.expm1(log_ratio) - log_ratio  # (B, T) expm1 keeps precision when r ≈ 1


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k2 estimate of KL(π_θ ‖ π_ref): ½·(log π_θ − log π_ref)² (biased, low variance, never negative;
    its gradient is the KL's gradient under on-policy samples). http://joschu.net/blog/kl-approx.html"""
    return 0.5 * (logprobs - ref_logprobs) ** 2  # (B, T)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token KL estimate with the named estimator ("k1", "k2" or "k3")."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k2":
        return kl_k2(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def per_token_rewards(score: Tensor, kl: Tensor, kl_coef: float, mask: Tensor) -> Tensor:
    """Per-token rewards: −β·kl on every real token, plus `score` at each row's last real token.

    The last real token is found from `mask` (the highest position holding a 1); a row
    whose mask is all zeros receives neither penalty nor score.
    """
    mask = mask.to(kl.dtype)  # (B, T)
    rewards = -kl_coef * kl * mask  # (B, T)
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device, dtype=kl.dtype)  # (T,)
    last = (positions * mask).argmax(dim=1, keepdim=True)  # (B, 1) distinct positions: no ties
    has_tokens = mask.amax(dim=1, keepdim=True)  # (B, 1) 0 for an empty row
    bonus = score.to(kl.dtype).unsqueeze(1) * has_tokens  # (B, 1)
    return rewards.scatter_add(1, last, bonus)  # (B, T)


# --------------------------------------------------------------------------- losses


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped PPO surrogate (B, T): max(−Â_t·ρ_t, −Â_t·clip(ρ_t, 1−ε, 1+ε)), ρ_t = π_θ/π_θ_old.

    Stats (detached scalars over real tokens): `approxkl` = ½·mean((log π_θ − log π_θ_old)²) and
    `clipfrac`, the fraction of real tokens where the clipped term is the larger one.
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).to(logprobs.dtype), mask),
        }
    return torch.max(pg_loss1, pg_loss2), stats


def aggregate_loss(per_token: Tensor, mask: Tensor, loss_type: LossType, *, minibatch_tokens: float,
                   minibatch_rows: int, response_length: int) -> Tensor:
    """One micro-batch's share of a minibatch's loss, so that the shares of every micro-batch (and the mean over
    processes of their sums) give the minibatch's loss for any split; TRL GRPOConfig.loss_type's names:

        dapo      Σ_tokens ℓ / tokens of the minibatch         every token weighs the same (Yu et al. 2025, DAPO)
        grpo      Σ_rows mean_t(ℓ) / rows of the minibatch     every response weighs the same (Shao et al. 2024)
        dr_grpo   Σ_tokens ℓ / (rows · response_length)        a constant normalizer: no length bias (Liu et al. 2025)

    `minibatch_tokens` and `minibatch_rows` are per process (the minibatch's mean over processes).
    """
    m = mask.to(per_token.dtype)
    if loss_type == "dapo":
        return (per_token * m).sum() / minibatch_tokens
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1.0)).sum() / minibatch_rows
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (minibatch_rows * response_length)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, averaged over real tokens.

        V_clip = V_old + clip(V − V_old, −ε, ε),  loss = ½·mean_t max((V − R)², (V_clip − R)²)

    Stats (detached scalar): `vf_clipfrac`, the fraction of real tokens where the
    clipped term is the larger one.
    """
    values_clipped = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )  # (B, T)
    v_loss_unclipped = (values - returns) ** 2  # (B, T)
    v_loss_clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask)
        }
    return loss, stats


# --------------------------------------------------------------------------- from logits


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] for every position: (B, T, V), (B, T) -> (B, T).

    Never materializes the full (B, T, V) log-softmax: fp32/fp64 logits use
    gather − logsumexp; half-precision logits (where logsumexp loses accuracy) go
    one row at a time in fp32. The result is at least fp32.
    """
    tokens = tokens.long().unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, tokens).squeeze(-1)  # (B, T)
        return picked - torch.logsumexp(logits, dim=-1)  # (B, T)
    rows = [
        row.float().log_softmax(dim=-1).gather(-1, row_tokens).squeeze(-1)  # (T,)
        for row, row_tokens in zip(logits, tokens)
    ]
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at every position: (B, T, V) -> (B, T).

    H = logsumexp(z) − Σ_v softmax(z)_v · z_v, computed one row at a time so the
    (T, V) softmax of only one row is alive at once.
    """
    rows = []
    for row in logits:  # (T, V)
        row = row.float()
        probs = torch.softmax(row, dim=-1)  # (T, V)
        rows.append(torch.logsumexp(row, dim=-1) - (probs * row).sum(dim=-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var(R − V)/Var(R) over real tokens: 1 is a perfect critic, 0 no better than a constant.

    NaN when the returns have no variance (or there are no real tokens), as in cleanrl.
    """
    if int(mask.sum().item()) == 0:
        return math.nan
    var_returns = masked_var(returns, mask, unbiased=False).item()
    if var_returns == 0.0:
        return math.nan
    var_residual = masked_var(returns - values, mask, unbiased=False).item()
    return 1.0 - var_residual / var_returns
