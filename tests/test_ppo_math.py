"""Unit tests of rlhf.ppo.losses and rlhf.ppo.controllers: numbers against values worked out by hand in the comments."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.ppo.controllers import AdaptiveKLController, FixedKLController, LagrangeController
from rlhf.ppo.losses import (
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_k1,
    kl_k3,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    clipped_surrogate,
    value_loss,
)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_ignores_pads_overall_and_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(masked_mean(x, mask), (1 + 2 + 3 + 4) / 4)
    close(masked_mean(x, mask, dim=1), [2.0, 4.0])


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    """A minibatch (or row) with no real tokens contributes 0, never NaN."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    close(masked_mean(x, mask, dim=1), [1.5, 0.0])


def test_masked_var_unbiased_and_biased_by_hand():
    # real entries 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2 -> unbiased 2/2, biased 2/3
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(masked_var(x, mask), 1.0)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)


def test_masked_var_raises_when_undefined():
    x = torch.tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least 2 masked entries, got 1"):
        masked_var(x, torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="got 0"):
        masked_var(x, torch.tensor([[0, 0]]), unbiased=False)


def test_masked_whiten_gives_mean_0_var_1_over_mask_and_leaves_pads_untouched():
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3.0 + 5.0
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    w = masked_whiten(x, mask)
    close(masked_mean(w, mask), 0.0, atol=1e-5)
    close(masked_var(w, mask), 1.0, atol=1e-5)
    pads = mask == 0
    assert torch.equal(w[pads], x[pads])


def test_masked_whiten_without_shift_keeps_the_mean():
    """shift_mean=False (used for rewards) rescales but keeps the masked mean."""
    torch.manual_seed(1)
    x = torch.randn(3, 5) + 2.0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    w = masked_whiten(x, mask, shift_mean=False)
    close(masked_mean(w, mask), masked_mean(x, mask).item(), atol=1e-5)
    close(masked_var(w, mask), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- GAE


def test_gae_reward_at_end_zero_values_gives_discount_pattern():
    """With V = 0 and one reward r at the end: Â = R = [γ²λ², γλ, 1]·r (torchtune's pattern)."""
    gamma, lam, r = 0.9, 0.95, 2.0
    rewards = torch.tensor([[0.0, 0.0, r]])
    values = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    expected = [(gamma * lam) ** 2 * r, gamma * lam * r, r]
    close(advantages, [expected])
    close(returns, [expected])


def test_gae_gamma_1_lam_095_by_hand():
    """γ = 1, λ = 0.95, 3 tokens, non-zero values; the closed form written out.

    r = [-0.1, -0.2, 3.0], V = [0.5, 1.0, 2.0], V after the last token = 0:
        δ2 = r2 − V2            = 3.0 − 2.0        = 1.0
        δ1 = r1 + V2 − V1       = −0.2 + 2.0 − 1.0 = 0.8
        δ0 = r0 + V1 − V0       = −0.1 + 1.0 − 0.5 = 0.4
        Â2 = δ2                                    = 1.0
        Â1 = δ1 + λ·δ2          = 0.8 + 0.95       = 1.75
        Â0 = δ0 + λ·δ1 + λ²·δ2  = 0.4 + 0.76 + 0.9025 = 2.0625
        R  = Â + V              = [2.5625, 2.75, 3.0]
    """
    rewards = torch.tensor([[-0.1, -0.2, 3.0]])
    values = torch.tensor([[0.5, 1.0, 2.0]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(advantages, [[2.0625, 1.75, 1.0]])
    close(returns, [[2.5625, 2.75, 3.0]])


def test_gae_with_lam_1_returns_are_monte_carlo_reward_to_go():
    """γ = λ = 1: R_t = Σ_{k≥t} r_k whatever the values (the critic cancels out)."""
    rewards = torch.tensor([[-0.1, -0.2, 3.0]])
    values = torch.tensor([[0.5, 1.0, 2.0]])
    _, returns = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(returns, [[2.7, 3.0 - 0.2, 3.0]])


def test_gae_padded_rows_bootstrap_0_after_last_real_token_and_0_at_pads():
    """Garbage rewards/values at pads change nothing; a padded row equals the same row alone."""
    rewards = torch.tensor([[-0.1, -0.2, 3.0, 0.0], [-0.1, 1.0, 7.0, 7.0], [5.0, 5.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 1.0, 2.0, 0.0], [0.5, 1.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: the 3-token case above, then a pad
    close(advantages[0], [2.0625, 1.75, 1.0, 0.0])
    close(returns[0], [2.5625, 2.75, 3.0, 0.0])
    # row 1: δ1 = 1.0 − 1.0 = 0 (V after the end is 0, not 9), δ0 = −0.1 + 1.0 − 0.5 = 0.4
    #        Â = [0.4 + 0.95·0, 0] = [0.4, 0],  R = [0.9, 1.0]
    close(advantages[1], [0.4, 0.0, 0.0, 0.0])
    close(returns[1], [0.9, 1.0, 0.0, 0.0])
    # row 2: no real tokens at all
    close(advantages[2], [0.0] * 4)
    close(returns[2], [0.0] * 4)
    alone_adv, alone_ret = compute_gae(rewards[1:2, :2], values[1:2, :2], torch.ones(1, 2), 1.0, 0.95)
    close(advantages[1:2, :2], alone_adv)
    close(returns[1:2, :2], alone_ret)


def test_gae_outputs_are_targets_without_grad():
    """Advantages and returns must not carry gradient back into the critic."""
    values = torch.tensor([[0.5, 1.0]], requires_grad=True)
    advantages, returns = compute_gae(torch.tensor([[0.0, 1.0]]), values, torch.ones(1, 2), 1.0, 0.95)
    assert not advantages.requires_grad and not returns.requires_grad


# --------------------------------------------------------------------------- KL


def test_kl_k1_and_k3_by_hand():
    # p = 0.5, q = 0.25: k1 = log 2;  r = q/p = 0.5, k3 = (0.5 − 1) − log 0.5 = log 2 − 0.5
    # p = 0.25, q = 0.5: k1 = −log 2; r = 2,       k3 = (2 − 1) − log 2 = 1 − log 2
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    log2 = math.log(2.0)
    close(kl_k1(logp, ref), [[log2, -log2, 0.0]])
    close(kl_k3(logp, ref), [[log2 - 0.5, 1.0 - log2, 0.0]])
    close(kl_penalty(logp, ref, "k1"), kl_k1(logp, ref))
    close(kl_penalty(logp, ref, "k3"), kl_k3(logp, ref))


def test_kl_k3_is_never_negative_while_k1_can_be():
    torch.manual_seed(2)
    logp = torch.randn(64, 32) * 3.0
    ref = torch.randn(64, 32) * 3.0
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k1(logp, ref) < 0).any()


def test_k1_and_k3_expectations_under_policy_equal_exact_kl():
    """Both estimators are unbiased: Σ_a p(a)·k(a) = KL(p ‖ q) exactly over the full support."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    close((p * kl_k1(p.log(), q.log())).sum(), exact.item(), atol=1e-12)
    close((p * kl_k3(p.log(), q.log())).sum(), exact.item(), atol=1e-12)


def test_kl_k2_by_hand_is_half_the_squared_log_ratio():
    # log ratios 0.2 and −0.4: k2 = ½·0.04 = 0.02 and ½·0.16 = 0.08, whatever the sign
    logprobs, ref = torch.tensor([[-1.0, -2.4]]), torch.tensor([[-1.2, -2.0]])
    close(kl_penalty(logprobs, ref, "k2"), torch.tensor([[0.02, 0.08]]), atol=1e-6)


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="'k1', 'k2' or 'k3'.*'k4'"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- per-token rewards


def test_per_token_rewards_places_score_at_last_real_token():
    score = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    rewards = per_token_rewards(score, kl, kl_coef=0.1, mask=mask)
    # row 0: −0.1·kl on 3 real tokens, score 2 added at index 2, pad 0
    # row 1: one real token: −0.05 + (−1)
    # row 2: empty row: nothing at all, not even the score
    close(rewards, [[-0.1, -0.2, -0.3 + 2.0, 0.0], [-0.05 - 1.0, 0.0, 0.0, 0.0], [0.0] * 4])


# --------------------------------------------------------------------------- losses


def test_policy_loss_clipping_by_hand():
    """ε = 0.2; the pessimistic (larger) term wins, pads are ignored, clipped tokens get no gradient.

    token 0: ρ = 1.5, Â = +1: −1.5 vs −1.2 -> −1.2 (clipped)
    token 1: ρ = 0.5, Â = +1: −0.5 vs −0.8 -> −0.5 (unclipped)
    token 2: ρ = 0.5, Â = −1: +0.5 vs +0.8 -> +0.8 (clipped)
    token 3: pad with ρ = 100
    loss = (−1.2 − 0.5 + 0.8)/3 = −0.3, clipfrac = 2/3,
    approxkl = ½·(log²1.5 + 2·log²0.5)/3
    """
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 100.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    per_token, stats = clipped_surrogate(logp, old, advantages, mask, cliprange=0.2)
    loss = masked_mean(per_token, mask)
    close(loss.detach(), -0.3)
    close(stats["clipfrac"], 2.0 / 3.0)
    close(stats["approxkl"], 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3)
    loss.backward()
    # d/dlogp of −Â·ρ/3 = −Â·ρ/3 on the unclipped token; 0 where the clip is active or a pad
    close(logp.grad, [[0.0, -0.5 / 3, 0.0, 0.0]])


def test_policy_loss_on_policy_is_minus_mean_advantage_and_never_clips():
    advantages = torch.tensor([[1.0, -3.0, 2.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    per_token, stats = clipped_surrogate(logp, logp.clone(), advantages, torch.ones(1, 3), cliprange=0.2)
    loss = masked_mean(per_token, torch.ones(1, 3))
    close(loss, 0.0)
    close(stats["clipfrac"], 0.0)
    close(stats["approxkl"], 0.0)


def test_value_loss_clipping_by_hand():
    """ε = 0.2; ½·mean of the larger squared error, pads ignored.

    token 0: V_old 1.0, V 1.5 -> V_clip 1.2, R 1.4: 0.01 vs 0.04 -> 0.04 (clipped)
    token 1: V_old 1.0, V 1.1 -> V_clip 1.1, R 2.0: 0.81 vs 0.81 -> 0.81 (within range)
    token 2: V_old 0.0, V −0.5 -> V_clip −0.2, R 0.0: 0.25 vs 0.04 -> 0.25 (unclipped wins)
    token 3: pad
    loss = ½·(0.04 + 0.81 + 0.25)/3 = 0.55/3, vf_clipfrac = 1/3
    """
    values = torch.tensor([[1.5, 1.1, -0.5, 50.0]])
    old_values = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.4, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    close(loss, 0.55 / 3, atol=1e-6)
    close(stats["vf_clipfrac"], 1.0 / 3.0)


# --------------------------------------------------------------------------- from logits


def test_logprobs_from_logits_matches_log_softmax_gather_fp32_and_bf16():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 11) * 4.0
    tokens = torch.randint(0, 11, (2, 5))
    reference = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens), reference, atol=1e-5)
    bf16 = logits.to(torch.bfloat16)
    from_bf16 = logprobs_from_logits(bf16, tokens)
    assert from_bf16.dtype == torch.float32
    reference_bf16 = torch.log_softmax(bf16.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(from_bf16, reference_bf16, atol=1e-5)


def test_entropy_from_logits_uniform_is_log_v_and_peaked_is_zero():
    logits = torch.zeros(2, 3, 8)
    logits[1, :, 0] = 1e4  # one token holds all the mass
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (2, 3)
    close(entropy[0], [math.log(8.0)] * 3, atol=1e-5)
    close(entropy[1], [0.0] * 3, atol=1e-5)


def test_explained_variance_perfect_constant_and_pads_ignored():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask) == pytest.approx(0.0)
    # residual R − V = [0, 0, 1]: var 2/9 against var(R) 2/3 -> 1 − 1/3
    values = torch.tensor([[1.0, 2.0, 2.0, -7.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(2.0 / 3.0)
    assert math.isnan(explained_variance(values, torch.ones(1, 4), mask))


# --------------------------------------------------------------------------- controllers


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05


def test_adaptive_kl_goes_up_above_target_and_down_below_by_hand():
    """Ziegler: e = clip(KL/target − 1, ±0.2), β ← β·(1 + e·n/horizon); target 6, horizon 10000, n 64."""
    up = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    up.update(current_kl=12.0, n_steps=64)  # e = 1 -> clipped to 0.2
    assert up.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000))
    down = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    down.update(current_kl=3.0, n_steps=64)  # e = −0.5 -> clipped to −0.2
    assert down.value == pytest.approx(0.2 * (1 - 0.2 * 64 / 10000))
    near = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    near.update(current_kl=6.6, n_steps=64)  # e = 0.1, inside the clip
    assert near.value == pytest.approx(0.2 * (1 + 0.1 * 64 / 10000))
    assert down.value < 0.2 < near.value < up.value


def test_adaptive_kl_rejects_non_positive_target():
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.2, target=0.0, horizon=10000)


def test_lagrange_multiplier_rises_over_budget_and_is_clipped_at_0_and_max():
    ctl = LagrangeController(init=0.5, budget=0.1, lr=1.0, max_value=2.0)
    ctl.update(mean_toxicity=0.3)  # 0.5 + (0.3 − 0.1)
    assert ctl.value == pytest.approx(0.7)
    ctl.update(mean_toxicity=0.0)  # 0.7 − 0.1, under budget: falls
    assert ctl.value == pytest.approx(0.6)
    for _ in range(10):
        ctl.update(mean_toxicity=0.0)
    assert ctl.value == 0.0  # never negative
    ctl.update(mean_toxicity=100.0)
    assert ctl.value == 2.0  # capped at max_value


@pytest.mark.parametrize(
    "make, step",
    [
        (lambda: FixedKLController(0.05), lambda c: c.update(1.0, 8)),
        (lambda: AdaptiveKLController(0.2, 6.0, 100), lambda c: c.update(9.0, 8)),
        (lambda: LagrangeController(0.5, 0.1, 0.5, 3.0), lambda c: c.update(0.4)),
    ],
    ids=["fixed", "adaptive", "lagrange"],
)
def test_controller_state_dict_round_trip_resumes_the_same_trajectory(make, step):
    """A resumed controller (fresh object + load_state_dict) continues exactly as the original."""
    original = make()
    for _ in range(3):
        step(original)
    state = json.loads(json.dumps(original.state_dict()))  # checkpointable as plain JSON
    resumed = make()
    resumed.value = -123.0
    resumed.load_state_dict(state)
    assert resumed.value == original.value
    step(original)
    step(resumed)
    assert resumed.value == original.value


def test_controller_load_state_dict_names_missing_key():
    with pytest.raises(ValueError, match="AdaptiveKLController.*'value'"):
        AdaptiveKLController(0.2, 6.0, 100).load_state_dict({})


# --------------------------------------------------------------------------- batch arithmetic
