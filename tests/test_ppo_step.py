"""Unit tests of a PPO step's pieces between rollout and update: reward assembly (rlhf.ppo.rewards), the step's
metrics and the run's summary (rlhf.ppo.metrics), and the prompt order (rlhf.ppo.rollout.prompt_indices).
Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.errors import UserError
from rlhf.ppo.metrics import check_finite, run_summary, step_metrics
from rlhf.ppo.rewards import gae_targets, rm_score, sequence_rewards
from rlhf.ppo.rollout import prompt_indices


def test_sequence_rewards_normalize_the_rm_score_and_subtract_toxicity_and_the_missing_eos_penalty():
    # score = (RM − 1) / 2 = [0.5, −0.5, 0.0]; total = score − 2·toxicity − 1·[no EOS]
    score = rm_score(torch.tensor([2.0, 0.0, 1.0]), reward_mean=1.0, reward_std=2.0)
    out = sequence_rewards({"rm": score, "toxicity": torch.tensor([0.5, 0.0, 1.0])}, {"rm": 1.0, "toxicity": -2.0},
                           torch.tensor([True, False, True]), missing_eos_penalty=1.0)
    torch.testing.assert_close(out.score, torch.tensor([0.5, -0.5, 0.0]))
    torch.testing.assert_close(out.toxicity, torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(out.total, torch.tensor([-0.5, -1.5, -2.0]))


def _two_rows():
    # Row 0 has two real tokens, row 1 one. k1 KL per token: [0.2, 0.4] and [0.1, pad].
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -5.0]])
    ref_logprobs = torch.tensor([[-1.2, -2.4], [-1.1, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logprobs, ref_logprobs, mask


def test_gae_targets_put_the_total_at_the_last_real_token_under_a_per_token_kl_penalty():
    logprobs, ref_logprobs, mask = _two_rows()
    t = gae_targets(torch.tensor([1.0, 2.0]), logprobs, ref_logprobs, torch.zeros(2, 2), mask, kl_coef=0.1,
                    kl_estimator="k1", gamma=1.0, lam=1.0, whiten_rewards=False, world_size=1)
    torch.testing.assert_close(t.kl * mask, torch.tensor([[0.2, 0.4], [0.1, 0.0]]))
    # rewards: −0.1·kl, plus the total at the last real token: [−0.02, −0.04 + 1], [−0.01 + 2, 0]
    torch.testing.assert_close(t.rewards, torch.tensor([[-0.02, 0.96], [1.99, 0.0]]))
    # γ = λ = 1 and V = 0: returns are the rewards summed from each token to the end of its row.
    torch.testing.assert_close(t.returns, torch.tensor([[0.94, 0.96], [1.99, 0.0]]))
    # Advantages: the same numbers whitened over the three real tokens; the pad stays 0.
    real = t.advantages[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6) and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert real.argsort().tolist() == [0, 1, 2] and t.advantages[1, 1] == 0


def test_step_metrics_are_the_namespaced_means_of_a_step():
    logprobs, ref_logprobs, mask = _two_rows()
    kl = (logprobs - ref_logprobs) * mask
    update = {"approxkl": 0.01, "clipfrac": 0.1, "entropy": 2.0, "pg_loss": -0.3, "vf_loss": 0.4, "vf_clipfrac": 0.2}
    m = step_metrics(3, 8, score=torch.tensor([0.5, -0.5]), toxicity=torch.tensor([0.2, 0.0]),
                     total=torch.tensor([1.0, 2.0]), logprobs=logprobs, ref_logprobs=ref_logprobs, kl=kl, mask=mask,
                     values=torch.zeros(2, 2), returns=torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
                     has_eos=torch.tensor([True, False]), kl_coef=0.1, toxicity_coef=2.0, update=update,
                     rollout_s=1.5, update_s=0.5)
    assert m["step"] == 3 and m["episodes"] == 24 and m["episodes_per_s"] == pytest.approx(4.0)  # 8 episodes / 2 s
    assert m["objective/score"] == pytest.approx(0.0) and m["objective/toxicity"] == pytest.approx(0.1)
    assert m["objective/kl"] == pytest.approx((0.6 + 0.1) / 2)  # k1 summed per response, mean over responses
    assert m["objective/rlhf_reward"] == pytest.approx(((1.0 - 0.06) + (2.0 - 0.01)) / 2)
    assert m["objective/kl_k3"] > 0 and m["objective/kl_coef"] == 0.1 and m["objective/toxicity_coef"] == 2.0
    assert m["loss/policy"] == -0.3 and m["val/vf_loss"] == 0.4 and m["val/clipfrac"] == 0.2
    assert m["response/length_mean"] == 1.5 and m["response/eos_rate"] == 0.5
    assert m["val/explained_variance"] == pytest.approx(0.0)  # V = 0 explains none of the returns' variance


def test_a_non_finite_metric_stops_the_run_naming_it_but_a_constant_return_does_not():
    check_finite({"step": 2, "val/explained_variance": math.nan, "loss/policy": 0.1}, "work")
    with pytest.raises(UserError, match=r"step 2: non-finite loss/policy, val/vf_loss; .*kept in work"):
        check_finite({"step": 2, "loss/policy": math.nan, "val/vf_loss": math.inf, "objective/kl": 1.0}, "work")


def test_run_summary_keeps_the_last_step_and_the_first_and_last_quarter_means():
    history = [{"step": s, "episodes": 4 * s, "objective/score": float(s), "objective/toxicity": 1.0 / s}
               for s in range(1, 9)]
    out = run_summary(history)
    assert out["objective/score"] == 8.0 and "episodes" not in out and out["steps"] == 8
    assert out["score_first_quarter"] == 1.5 and out["score_last_quarter"] == 7.5  # steps 1-2 and 7-8
    assert out["toxicity_first_quarter"] == pytest.approx(0.75)
    assert run_summary(history[:1])["score_first_quarter"] == 1.0  # a quarter is at least one step


def test_prompt_order_is_one_permutation_per_pass_split_between_processes_and_needs_only_the_step():
    # 6 prompts, 4 per step over 2 processes: steps 0-2 cover two passes, each pass a permutation.
    seen = [prompt_indices(step, rank, batch_size=4, local_batch_size=2, n_prompts=6, seed=3)
            for step in range(3) for rank in range(2)]
    stream = [i for chunk in seen for i in chunk]
    assert sorted(stream[:6]) == list(range(6)) and sorted(stream[6:]) == list(range(6))
    assert stream[:6] != stream[6:]  # another permutation for the second pass
    assert prompt_indices(2, 1, batch_size=4, local_batch_size=2, n_prompts=6, seed=3) == seen[5]  # resume: same
    other_seed = [i for step in range(3) for rank in range(2)
                  for i in prompt_indices(step, rank, batch_size=4, local_batch_size=2, n_prompts=6, seed=4)]
    assert other_seed != stream


def test_the_entry_keeps_at_most_n_policy_snapshots_evenly_spread_from_first_to_last(tmp_path):
    from rlhf.ppo.checkpoint import thin_snapshots

    for step in (8, 16, 24, 32, 40, 48, 56):
        (tmp_path / "snapshots" / f"step-{step}").mkdir(parents=True)
    (tmp_path / "snapshots" / "tmp-step-64").mkdir()  # cut off mid-write: never kept
    names = lambda keep: [p.name for p in thin_snapshots(tmp_path, keep)]  # noqa: E731
    assert names(10) == [f"step-{s}" for s in (8, 16, 24, 32, 40, 48, 56)]
    assert names(3) == ["step-8", "step-32", "step-56"]  # indices 0, 3, 6 of 7
    assert names(1) == ["step-56"] and names(0) == []


def test_training_flags_name_an_accelerating_kl_and_a_collapsing_entropy_but_not_a_steady_run():
    from rlhf.ppo.metrics import training_flags

    steady = [{"objective/kl": 0.1 * s, "policy/entropy": 2.0} for s in range(12)]
    assert training_flags(steady) == []
    # KL: slope 0.1 over steps 0-5, then 0.5 per step; entropy 2.0 → 0.5.
    bad = [{"objective/kl": 0.1 * s if s < 6 else 0.5 + 0.5 * (s - 5), "policy/entropy": 2.0 if s < 3 else 0.5}
           for s in range(12)]
    flags = training_flags(bad)
    assert len(flags) == 2
    assert flags[0].startswith("KL accelerating: +0.100/step over the first half of the steps, +0.500/step")
    assert flags[1] == "entropy collapsing: 2.000 over the first quarter of the steps, 0.500 over the last"
    assert training_flags(bad[:7]) == []  # too short to tell
