"""The critic-free advantage estimators (rlhf.ppo.estimators), the loss aggregations (rlhf.ppo.losses.aggregate_loss)
and the reward's named components (rlhf.ppo.rewards), on values worked out by hand in the comments."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from rlhf.errors import ConfigError, UserError
from rlhf.ppo import estimators as est
from rlhf.ppo.losses import aggregate_loss
from rlhf.ppo.rewards import (call_reward_func, critic_free_targets, load_reward_funcs, sequence_rewards,
                              standardize)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# Two prompts, k = 3 responses each: group A scores [1, 2, 6] (mean 3), group B [0, 0, 0] (all alike).
SCORES = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 0.0])


def test_grpo_divides_the_centered_score_by_the_groups_unbiased_std():
    # Group A: deviations [−2, −1, 3], unbiased std = sqrt((4+1+9)/2) = sqrt(7) ≈ 2.6458.
    # Group B: all equal, std 0: the 1e-4 keeps 0/0 away and the advantages are 0.
    s7 = math.sqrt(7) + 1e-4
    close(est.grpo_advantages(SCORES, 3), [-2 / s7, -1 / s7, 3 / s7, 0, 0, 0])


def test_dr_grpo_only_centers_the_score_in_its_group():
    close(est.dr_grpo_advantages(SCORES, 3), [-2, -1, 3, 0, 0, 0])


def test_rloo_subtracts_the_mean_of_the_other_responses_to_the_same_prompt():
    # 1 − (2+6)/2 = −3; 2 − (1+6)/2 = −1.5; 6 − (1+2)/2 = 4.5 (= k/(k−1)·[−2, −1, 3]).
    close(est.rloo_advantages(SCORES, 3), [-3, -1.5, 4.5, 0, 0, 0])


def test_group_estimators_refuse_scores_that_do_not_form_whole_groups_or_groups_of_one():
    with pytest.raises(ValueError, match="whole groups of 4"):
        est.rloo_advantages(SCORES, 4)
    with pytest.raises(ValueError, match="at least 2"):
        est.grpo_advantages(SCORES, 1)


def test_cumulative_returns_sum_the_rewards_to_go_and_stop_at_the_pads():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # γ = 0.5: row 0: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75; row 1 ignores the pad's 9: G1 = 7, G0 = 8.5.
    close(est.cumulative_returns(rewards, mask, 0.5), [[2.75, 3.5, 3.0], [8.5, 7.0, 0.0]])


def test_reinforce_pp_whitens_the_returns_over_every_real_token_of_the_batch():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # γ = 1: returns [[1, 1], [0, pad]]: over the 3 real tokens mean 2/3, unbiased var = (1/9+1/9+4/9)/2 = 1/3.
    adv = est.reinforce_pp_advantages(rewards, mask, 1.0, world_size=1)
    sd = math.sqrt(1 / 3 + 1e-8)
    close(adv, [[(1 / 3) / sd, (1 / 3) / sd], [(-2 / 3) / sd, 0.0]])
    # The baseline variant keeps the mean: only divided by the std.
    close(est.reinforce_pp_advantages(rewards, mask, 1.0, world_size=1, shift_mean=False),
          [[1 / sd, 1 / sd], [0.0, 0.0]])


def test_critic_free_targets_put_the_group_advantage_on_every_real_token_and_take_the_kl_from_the_reward():
    # k = 2, one prompt. k1 KL per token: row 0 [0.5, 0.5] (sum 1), row 1 [0.0, pad].
    total = torch.tensor([1.0, 1.0])
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5], [-2.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # β = 0.5: s = total − β·Σkl = [0.5, 1.0]; RLOO: [0.5 − 1.0, 1.0 − 0.5] = [−0.5, 0.5].
    t = critic_free_targets(total, logprobs, ref, mask, estimator="rloo", group_size=2, kl_coef=0.5,
                            kl_estimator="k1", gamma=1.0, world_size=1)
    close(t.advantages, [[-0.5, -0.5], [0.5, 0.0]])
    assert t.returns is None
    # KL in the loss instead (β = 0 here): equal totals, advantages 0.
    t = critic_free_targets(total, logprobs, ref, mask, estimator="rloo", group_size=2, kl_coef=0.0,
                            kl_estimator="k1", gamma=1.0, world_size=1)
    close(t.advantages, [[0.0, 0.0], [0.0, 0.0]])


def test_reinforce_baseline_centers_the_total_in_its_group_before_the_returns():
    # k = 2: totals [3, 1] → [1, −1] at each row's last token; no KL; γ = 1: returns [[1, 1], [−1, pad]].
    t = critic_free_targets(torch.tensor([3.0, 1.0]), torch.zeros(2, 2), torch.zeros(2, 2),
                            torch.tensor([[1, 1], [1, 0]]), estimator="reinforce_baseline", group_size=2,
                            kl_coef=0.1, kl_estimator="k1", gamma=1.0, world_size=1)
    # Divided by the std of [1, 1, −1] (unbiased var = (4/9+4/9+16/9)/2 = 4/3), the mean kept.
    sd = math.sqrt(4 / 3 + 1e-8)
    close(t.advantages, [[1 / sd, 1 / sd], [-1 / sd, 0.0]])


def test_aggregate_loss_weighs_tokens_responses_or_a_constant_as_trl_names_them():
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    kw = dict(minibatch_tokens=5.0, minibatch_rows=2, response_length=4)
    close(aggregate_loss(per_token, mask, "dapo", **kw), 8 / 5)  # (4·1 + 4) / 5 tokens
    close(aggregate_loss(per_token, mask, "grpo", **kw), (1 + 4) / 2)  # row means 1 and 4, over 2 rows
    close(aggregate_loss(per_token, mask, "dr_grpo", **kw), 8 / (2 * 4))  # ÷ rows × response_length
    # Split into two micro-batches of one row, the shares add up to the whole minibatch's loss.
    for kind in ("dapo", "grpo", "dr_grpo"):
        parts = sum(aggregate_loss(per_token[i:i + 1], mask[i:i + 1], kind, **kw) for i in range(2))
        close(parts, aggregate_loss(per_token, mask, kind, **kw))
    with pytest.raises(ValueError, match="bnpo"):
        aggregate_loss(per_token, mask, "bnpo", **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the reward's components


def test_sequence_rewards_weigh_each_component_and_subtract_the_missing_eos_penalty():
    # rm [0.5, −0.5], toxicity [0.2, 0.0], brevity [1, None]; c = rm 1, toxicity −2·1, brevity 0.5.
    comps = {"rm": torch.tensor([0.5, -0.5]), "toxicity": torch.tensor([0.2, 0.0]),
             "brevity": torch.tensor([1.0, math.nan])}
    out = sequence_rewards(comps, {"rm": 1.0, "toxicity": -2.0, "brevity": 0.5}, torch.tensor([True, False]),
                           missing_eos_penalty=1.0)
    # Row 0: 0.5 − 0.4 + 0.5 = 0.6; row 1: −0.5 − 0 + (None: nothing) − 1 (no EOS) = −1.5.
    close(out.total, [0.6, -1.5])
    close(out.score, [0.5, -0.5])
    # A component without a coefficient is measured only.
    close(sequence_rewards(comps, {"rm": 1.0}, torch.tensor([True, True]), missing_eos_penalty=0.0).total, [0.5, -0.5])


def test_normalize_then_sum_standardizes_each_component_within_its_group_first():
    # k = 2. rm [1, 3 | 0, 0] → [−1/(√2+ε), 1/(√2+ε) | 0, 0]; a huge-scale component [100, 300 | 5, 5] → the same.
    comps = {"rm": torch.tensor([1.0, 3.0, 0.0, 0.0]), "big": torch.tensor([100.0, 300.0, 5.0, 5.0]),
             "toxicity": torch.zeros(4)}
    out = sequence_rewards(comps, {"rm": 1.0, "big": 1.0}, torch.ones(4, dtype=torch.bool), missing_eos_penalty=0.0,
                           aggregation="normalize_then_sum", group_size=2)
    a = 1 / (math.sqrt(2) + 1e-4)
    b = 1 / (math.sqrt(2) + 1e-4 / 100)
    close(out.total, [-a - b, a + b, 0.0, 0.0], atol=1e-4)
    # With k = 1: over the whole batch. [1, 3, 0, 0]: mean 1, unbiased std sqrt((0+4+1+1)/3) = √2.
    close(standardize(torch.tensor([1.0, 3.0, 0.0, 0.0]), 1, 1), torch.tensor([0.0, 2.0, -1.0, -1.0]) / (math.sqrt(2) + 1e-4))


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        def brevity(prompts, completions, completion_ids, **kwargs):
            return [1.0 / (1 + len(ids)) for ids in completion_ids]

        def topic(prompts, completions, topic, **kwargs):
            return [1.0 if t and t in c[0]["content"] else None for t, c in zip(topic, completions)]

        def short(prompts, completions, **kwargs):
            return [1.0]

        def words(prompts, completions, **kwargs):
            return ["many"] * len(completions)
    '''))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_user_reward_functions_load_by_module_or_file_and_get_trls_arguments(user_rewards):
    funcs = load_reward_funcs(["rm", "toxicity", "my_rewards:brevity", str(user_rewards / "my_rewards.py") + ":topic"],
                              [1.0, 1.0, 0.5, 2.0])
    assert [(f.name, f.weight) for f in funcs] == [("rm", 1.0), ("toxicity", 1.0), ("brevity", 0.5), ("topic", 2.0)]
    prompts = [[{"role": "user", "content": "tea?"}]] * 2
    values = call_reward_func(funcs[2], prompts, ["a b c", ""], [[5, 6, 7], [2]], {"topic": ["x", "y"]})
    close(values, [0.25, 0.5])
    values = call_reward_func(funcs[3], prompts, ["I like tea", "no"], [[1], [2]], {"topic": ["tea", "tea"]})
    assert values[0].item() == 1.0 and math.isnan(values[1].item())


def test_bad_reward_settings_and_returns_are_refused_naming_the_function(user_rewards):
    with pytest.raises(ConfigError, match=r"reward_weights has 2 values for 3 reward_funcs"):
        load_reward_funcs(["rm", "toxicity", "my_rewards:brevity"], [1.0, 1.0])
    with pytest.raises(ConfigError, match=r"reward_funcs\[1\] = 'nowhere:fn': importing nowhere failed"):
        load_reward_funcs(["rm", "nowhere:fn"], None)
    with pytest.raises(ConfigError, match=r"my_rewards has no function 'missing'"):
        load_reward_funcs(["rm", "my_rewards:missing"], None)
    with pytest.raises(ConfigError, match="must include rm"):
        load_reward_funcs(["toxicity"], None)
    funcs = {f.name: f for f in load_reward_funcs(["rm", "my_rewards:short", "my_rewards:words"], None)}
    with pytest.raises(UserError, match=r"reward function short \(my_rewards:short\) returned 1 values for 2"):
        call_reward_func(funcs["short"], [[]] * 2, ["a", "b"], [[1], [2]], {})
    with pytest.raises(UserError, match=r"returned 'many'; expected floats"):
        call_reward_func(funcs["words"], [[]] * 2, ["a", "b"], [[1], [2]], {})
