"""Stage 04 (compare): the metric functions against hand-worked values, and the stage end to end on tiny
models producing every report file.

The end-to-end registry is the session's tiny `pretrain` entry (copied), a 2-step SFT run through its
command line, and FAKE `reward`, `ppo` and `dpo` entries registered directly (a random LoRA adapter + score
head; a random `policy` adapter, policy snapshots and a metrics.jsonl; the SFT model with nudged weights), so
these tests do not depend on stages 02 and 03.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_stage, run_script
from rlhf.eval.differences import paired_differences
from rlhf.eval.frontier import POINT_KEYS, overoptimization_flags, point
from rlhf.eval.lineup import Contender, aligned_runs, attribution_pairs, has_toxicity_term, run_label
from rlhf.eval.metrics import (bootstrap_ci, interval, intervals_vs_base, means, per_prompt_metrics, perplexity,
                                  summarize, toxicity_per_prompt, win_matrix, win_rate, win_shares)
from rlhf.eval.sampling import Judged, Samples
from rlhf.eval.toxicity import judge_spec, load_scorers, reward_scorer_spec
from rlhf.registry import Entry, Registry
from rlhf.eval.text import distinct_n

# ---------------------------------------------------------------------------- metric functions


def test_distinct_n_is_unique_ngrams_over_all_ngrams_across_texts():
    # "a b a b": unigrams a,b,a,b -> 2/4; bigrams ab,ba,ab -> 2/3.
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # n-grams never cross texts: "a a" + "a b" has bigrams aa, ab (2 distinct of 2), unigrams a,a,a,b (2 of 4).
    assert distinct_n(["a a", "a b"], 2) == pytest.approx(1.0)
    assert distinct_n(["a a", "a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["", "x"], 2) == 0.0  # no bigram anywhere


def test_win_rate_counts_ties_as_half():
    # Paired by (prompt, sample): win, tie, loss, tie -> (1 + 0.5 + 0 + 0.5) / 4.
    model = np.array([[1.0, 2.0], [3.0, 3.0]])
    base = np.array([[0.0, 2.0], [4.0, 3.0]])
    assert win_shares(model, base).tolist() == [0.75, 0.25]
    assert win_rate(model, base) == pytest.approx(0.5)
    assert win_rate(base, base) == 0.5  # a model against itself: all ties
    with pytest.raises(ValueError):
        win_rate(model, base[:1])


def test_bootstrap_ci_of_constant_data_has_zero_width():
    assert bootstrap_ci(np.full(10, 0.3)) == (0.3, 0.3)
    assert interval(np.zeros(4), n_resamples=50, confidence=0.95, seed=1) == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_ci_contains_the_mean_is_seeded_and_widens_with_confidence():
    values = np.array([0.0, 1.0] * 50)  # mean 0.5, standard error 0.05
    low, high = bootstrap_ci(values, n_resamples=2000, seed=0)
    assert low < 0.5 < high
    # Normal approximation: 0.5 ± 1.96·0.05; the percentile bootstrap lands close to it.
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02) and high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_ci(values, n_resamples=2000, seed=0) == (low, high)  # same seed, same interval
    low80, high80 = bootstrap_ci(values, n_resamples=2000, confidence=0.8, seed=0)
    assert low < low80 < high80 < high
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([])))


def test_toxicity_per_prompt_gives_the_realtoxicityprompts_measures():
    # 2 prompts × 2 samples. Max per prompt: 0.9, 0.3 -> expected max toxicity 0.6;
    # prompts with a sample >= 0.5: 1 of 2 -> toxicity probability 0.5; samples >= 0.5: 1 of 4.
    scores = np.array([[0.1, 0.9], [0.2, 0.3]])
    per_prompt = toxicity_per_prompt(scores, threshold=0.5)
    got = means(per_prompt)
    assert got == pytest.approx({"toxicity_mean": 0.375, "toxicity_rate": 0.25,
                                 "expected_max_toxicity": 0.6, "toxicity_probability": 0.5})
    # Restricted to a subset of prompts (the adversarial ones).
    assert means(per_prompt, np.array([False, True]))["expected_max_toxicity"] == pytest.approx(0.3)
    # 2 prompts × 3 samples: max per prompt 0.7, 0.4 -> 0.55; a score equal to the threshold counts as toxic.
    scores = np.array([[0.1, 0.7, 0.2], [0.0, 0.3, 0.4]])
    assert means(toxicity_per_prompt(scores, threshold=0.5)) == pytest.approx(
        {"toxicity_mean": 1.7 / 6, "toxicity_rate": 1 / 6, "expected_max_toxicity": 0.55, "toxicity_probability": 0.5})
    assert means(toxicity_per_prompt(scores, threshold=0.3))["toxicity_probability"] == pytest.approx(1.0)


def test_per_prompt_metrics_summary_and_paired_intervals_on_a_hand_worked_case():
    # 2 prompts × 2 samples; prompt 1 is adversarial.
    rewards = np.array([[1.0, 0.0], [2.0, 2.0]])
    base_rewards = np.array([[0.0, 0.0], [3.0, 1.0]])  # win, tie | loss, win -> shares 0.75, 0.5
    toxicity = np.array([[0.0, 0.0], [0.6, 0.2]])
    lengths = np.array([[4.0, 6.0], [2.0, 2.0]])
    has_eos = np.array([[1.0, 0.0], [1.0, 1.0]])
    pp = per_prompt_metrics(rewards, base_rewards, toxicity, lengths, has_eos, kl=np.full((2, 2), 0.5), threshold=0.5)
    adversarial = np.array([False, True])
    got = summarize(pp, adversarial)
    assert got["reward_mean"] == pytest.approx(1.25) and got["win_rate"] == pytest.approx(0.625)
    assert got["length_mean"] == 3.5 and got["eos_rate"] == 0.75 and got["kl_to_base"] == 0.5
    assert got["adversarial/toxicity_rate"] == 0.5 and got["adversarial/win_rate"] == 0.5
    assert got["adversarial/expected_max_toxicity"] == pytest.approx(0.6)
    # Against itself every paired difference is 0, so every delta interval is [0, 0] and win rate 0.5.
    same = intervals_vs_base(pp, pp, adversarial, n_resamples=100, confidence=0.95, seed=0)
    assert same["delta/reward_mean"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert same["delta/adversarial/toxicity_rate"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert same["kl_to_base"] == {"value": 0.5, "low": 0.5, "high": 0.5}


def test_perplexity_is_exp_of_mean_token_nll():
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert math.isnan(perplexity(0.0, 0))


def test_win_matrix_pairs_every_model_with_every_other():
    # x vs y: win, tie -> 0.75; x vs z: loss, loss -> 0; y vs z: loss, tie -> 0.25.
    scores = {"x": np.array([[1.0, 0.0]]), "y": np.array([[0.0, 0.0]]), "z": np.array([[2.0, 0.0]])}
    m = win_matrix(scores)
    assert m == {"x": {"y": 0.75, "z": 0.25}, "y": {"x": 0.25, "z": 0.25}, "z": {"x": 0.75, "y": 0.75}}
    assert all(m[a][b] + m[b][a] == 1.0 for a in m for b in m[a])


def test_paired_differences_bootstrap_the_per_prompt_differences_on_a_hand_worked_case():
    # b varies a lot between prompts, a = b + (0, 1): the paired differences are 0 and 1, so delta = 0.5 and the
    # bootstrap means of 2 resampled prompts are 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4): the 95% CI is [0, 1].
    # Unpaired, the two prompts' spread of 100 would swamp it.
    per_prompt = {"a": {"reward_mean": np.array([0.0, 101.0]), "toxicity_rate": np.array([0.5, 0.5])},
                  "b": {"reward_mean": np.array([0.0, 100.0]), "toxicity_rate": np.array([0.25, 0.0])}}
    rows = paired_differences(per_prompt, [("a", "b", "q")], adversarial=np.array([False, True]), n_resamples=2000,
                              confidence=0.95, seed=0)
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["reward_mean"] == {"a": "a", "b": "b", "question": "q", "metric": "reward_mean", "delta": 0.5,
                                        "ci_low": 0.0, "ci_high": 1.0}
    # toxicity differences 0.25 and 0.5 -> delta 0.375 in [0.25, 0.5]; on the adversarial prompt alone: 0.5, no width.
    assert by_metric["toxicity_rate"]["delta"] == 0.375
    assert (by_metric["toxicity_rate"]["ci_low"], by_metric["toxicity_rate"]["ci_high"]) == (0.25, 0.5)
    adv = by_metric["adversarial/toxicity_rate"]
    assert (adv["delta"], adv["ci_low"], adv["ci_high"]) == (0.5, 0.5, 0.5)
    assert "reward_toxicity_rate" not in by_metric  # a metric the models lack is left out
    # The interval is the bootstrap of the paired differences, with the same seed.
    assert (by_metric["reward_mean"]["ci_low"], by_metric["reward_mean"]["ci_high"]) == bootstrap_ci(
        np.array([0.0, 1.0]), n_resamples=2000, seed=0)
    # Without adversarial prompts there is no adversarial row.
    rows = paired_differences(per_prompt, [("a", "b", "q")], adversarial=np.array([False, False]), n_resamples=10,
                              confidence=0.95, seed=0)
    assert [r["metric"] for r in rows] == ["reward_mean", "toxicity_rate"]


def _entry(stage: str, id_: str, config: dict | None = None, parents: tuple = ()) -> Entry:
    return Entry(id_, stage, list(parents), Path("/nowhere"), config or {}, {}, {}, {}, None, {}, "")


def test_labels_say_stage_estimator_and_whether_the_reward_had_a_toxicity_term():
    assert run_label(_entry("ppo", "1", {"advantage_estimator": "gae", "toxicity_coef": 5.0})) == "ppo"
    assert run_label(_entry("ppo", "2", {})) == "ppo"  # entries from before estimators: PPO with its toxicity term
    assert run_label(_entry("ppo", "3", {"advantage_estimator": "gae", "toxicity_coef": 0.0})) == "ppo-tox0"
    assert run_label(_entry("ppo", "4", {"advantage_estimator": "grpo", "reward_funcs": ["rm"]})) == "grpo-tox0"
    assert run_label(_entry("ppo", "5", {"advantage_estimator": "rloo"})) == "rloo"
    assert run_label(_entry("dpo", "6", {"base_model": "sft:x"})) == "dpo"
    assert not has_toxicity_term({"reward_funcs": ["rm", "toxicity"], "reward_weights": [1.0, 0.0]})
    assert has_toxicity_term({"toxicity_coef": 0.0, "toxicity_budget": 0.05})  # the multiplier grows from 0


def test_aligned_runs_put_the_chosen_run_first_then_ppo_then_dpo_entries_of_the_same_sft():
    sft, other_sft = _entry("sft", "s1"), _entry("sft", "s2")
    ppo = [_entry("ppo", "aaaaaa", {"toxicity_coef": 5.0}, [sft.ref]),
           _entry("ppo", "bbbbbb", {"toxicity_coef": 0.0}, [sft.ref]),
           _entry("ppo", "cccccc", {"advantage_estimator": "grpo"}, [sft.ref]),
           _entry("ppo", "dddddd", {"toxicity_coef": 5.0}, [sft.ref]),
           _entry("ppo", "eeeeee", {}, [other_sft.ref])]
    dpo = [_entry("dpo", "ffffff", {}, [sft.ref]), _entry("dpo", "gggggg", {}, [other_sft.ref])]

    class FakeRegistry:
        def entries(self, stage):
            return {"ppo": ppo, "dpo": dpo}[stage]

    runs = aligned_runs(FakeRegistry(), ppo[3], sft)
    assert list(runs) == ["ppo", "ppo-aaaaaa", "ppo-tox0", "grpo", "dpo"]  # a label taken gets the id's end
    assert runs == {"ppo": "ppo:dddddd", "ppo-aaaaaa": "ppo:aaaaaa", "ppo-tox0": "ppo:bbbbbb", "grpo": "ppo:cccccc",
                    "dpo": "dpo:ffffff"}
    lineup = {"base": Contender("base", "pretrain:p", _entry("pretrain", "p")), "sft": Contender("sft", sft.ref, sft)}
    lineup |= {label: Contender(label, ref, next(e for e in ppo + dpo if e.ref == ref)) for label, ref in runs.items()}
    pairs = attribution_pairs(lineup)
    # The run without the toxicity term is paired with the first run of its estimator that has it (the chosen one).
    assert pairs[0] == ("ppo", "ppo-tox0", "what the toxicity term bought")
    assert [p[:2] for p in pairs if p[1] == "sft"] == [(label, "sft") for label in runs]
    assert [p[0] for p in pairs if p[1] == "base"] == ["sft", *runs]


def test_judge_defaults_to_another_family_than_the_reward_and_says_when_it_is_the_same():
    ppo_configs = {"ppo": {"toxicity_scorer": {"spec": "profanity-check"}},
                   "grpo": {"toxicity_scorer": {"spec": "better-profanity"}}, "dpo": {}}
    spec, notes = reward_scorer_spec(ppo_configs, "auto")
    assert spec == "profanity-check" and "different toxicity scorers" in notes[0]  # the first run's, with a note
    assert reward_scorer_spec({}, "better-profanity") == ("better-profanity", [])  # no RL entry: the stage's own
    assert judge_spec("auto", "profanity-check") == "better-profanity"
    assert judge_spec("auto", "better-profanity") == "profanity-check"
    assert judge_spec("auto", "detoxify:original") == "auto:unbiased"  # detoxify unbiased, or profanity-check offline
    assert judge_spec("detoxify:original", "detoxify:original") == "detoxify:original"  # named: as is
    reward, judge, notes = load_scorers("auto", "auto", {"ppo": ppo_configs["ppo"]}, threshold=0.5)
    assert (reward.spec, judge.spec, notes) == ("profanity-check", "better-profanity", [])
    reward, judge, notes = load_scorers("profanity-check", "profanity-check", {}, threshold=0.5)
    assert judge is reward and "is the reward's own scorer" in notes[0]


def test_frontier_points_subsets_and_overoptimization_flags_on_hand_worked_values():
    # 2 prompts x 2 samples, prompt-major; the first sample of each prompt: rows 0 and 2.
    samples = Samples([0, 0, 1, 1], [[1]] * 4, [[2]] * 4, ["a", "b", "c", "d"], [True] * 4, np.zeros(4))
    judged = Judged(samples, None, {"sft": np.array([1.0, 2.0, 3.0, 4.0]), "base": None},
                    np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.9, 0.0, 0.1, 0.0]), np.zeros(4))
    sub = judged.subset(2, 2, 1)
    assert sub.samples.texts == ["a", "c"] and sub.samples.prompt_index == [0, 1]
    p = point(sub.rewards, sub.toxicity, sub.kl["sft"], sub.kl["base"], threshold=0.5, step=3)
    assert list(p) == list(POINT_KEYS) and math.isnan(p.pop("kl_to_base"))
    assert p == {"step": 3, "kl_to_sft": 2.0, "reward_mean": 1.0, "toxicity_rate": 0.5}
    # Consecutive checkpoints, 100 samples each, SFT as step 0: reward up and toxicity 0.05 -> 0.20 (noise at a
    # pooled 0.125: 1.645 · sqrt(2 · 0.125 · 0.875 / 100) = 0.077) is a flag; 0.20 -> 0.22 is noise; reward down
    # with toxicity up is not the over-optimization signature.
    sft = {"reward_mean": 0.0, "toxicity_rate": 0.05}
    points = [{"step": 5, "reward_mean": 0.5, "toxicity_rate": 0.20}, {"step": 10, "reward_mean": 0.6,
              "toxicity_rate": 0.22}, {"step": 15, "reward_mean": 0.4, "toxicity_rate": 0.5}]
    flags = overoptimization_flags(points, 100, start=sft)
    assert flags == ["proxy reward up while the held-out judge worsens: step 0 → 5, reward +0.500, judged toxicity "
                     "rate +0.150 (100 samples each)"]
    assert overoptimization_flags(points, 100) == []  # without the SFT point the first pair is (5, 10)


# ---------------------------------------------------------------------------- fake entries


def _load_stage():
    """stages/04_compare.py as a module (its file name is not an importable name)."""
    return load_stage("04_compare.py")


def register_fake_ppo(reg_root: Path, reward: Entry, seed: int = 1, steps: int = 5, estimator: str = "gae",
                      toxicity_coef: float = 5.0, snapshot_steps: tuple[int, ...] = (),
                      training_flags: list[str] | None = None) -> Entry:
    """A `ppo` entry on sft:latest: a random (non-zero) `policy` LoRA adapter, tokenizer and a metrics.jsonl; with
    `snapshot_steps`, a random policy snapshot at each (snapshots/step-N/policy) and the last one as the final
    policy, as stage 03 keeps them. Its config records the reward's toxicity scorer (profanity-check)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = Registry(reg_root)
    sft = reg.get("sft:latest")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    staged = reg.staging_dir("ppo")
    adapters = [staged / "snapshots" / f"step-{s}" / "policy" for s in snapshot_steps] or [staged / "policy"]
    for i, folder in enumerate(adapters):
        torch.manual_seed(seed + 1000 * i)
        get_peft_model(AutoModelForCausalLM.from_pretrained(str(sft.path)), lora).save_pretrained(str(folder))
    if snapshot_steps:
        shutil.copytree(adapters[-1], staged / "policy")
    AutoTokenizer.from_pretrained(str(sft.path)).save_pretrained(str(staged))
    rows = [{"step": s, "objective/score": 0.1 * s, "objective/toxicity": 0.5 / s, "objective/kl": 0.2 * s,
             "objective/kl_coef": 0.05} for s in range(1, steps + 1)]
    (staged / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {k: v for k, v in rows[-1].items() if "/" in k}
    config = {"sft_model": sft.ref, "reward_model": reward.ref, "advantage_estimator": estimator,
              "toxicity_coef": toxicity_coef, "reward_funcs": ["rm", "toxicity"],
              "toxicity_scorer": {"spec": "profanity-check", "requested": "profanity-check"}}
    if training_flags is not None:
        config["training_flags"] = training_flags
    return reg.register("ppo", staged, parents=[sft.ref, reward.ref], config=config, metrics=final)


def register_fake_dpo(reg_root: Path, seed: int = 3) -> Entry:
    """A `dpo` entry on sft:latest: a full model, as stage 03_dpo registers, here the SFT model with its weights
    nudged, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = Registry(reg_root)
    sft = reg.get("sft:latest")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft.path))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    staged = reg.staging_dir("dpo")
    model.save_pretrained(str(staged))
    AutoTokenizer.from_pretrained(str(sft.path)).save_pretrained(str(staged))
    return reg.register("dpo", staged, parents=[sft.ref], config={"base_model": sft.ref}, metrics={"eval_loss": 0.6})


# frontier_prompts 0 and frontier_samples = samples_per_prompt: the frontier samples the very rows of the table,
# so a run's last snapshot (its final policy) must reproduce the run's own row.
TINY_COMPARE = ["--max_prompts", "9", "--samples_per_prompt", "2", "--max_new_tokens", "8",
                "--max_eval_dialogues", "4", "--bootstrap_resamples", "200", "--toxicity", "profanity-check",
                "--num_threads", "1", "--frontier_prompts", "0", "--frontier_samples", "2"]
FLAG = "KL accelerating: +0.100/step over the first half of the steps, +0.300/step over the second (final KL 2.00)"


@pytest.fixture(scope="module")
def compare_registry(rlhf_registry, tmp_path_factory) -> Path:
    """pretrain + a tiny SFT + a fake reward (conftest's `rlhf_registry`, copied) + fake aligned entries of that SFT:
    a GRPO run without snapshots, a PPO run without the toxicity term (snapshots at steps 2 and 4), a DPO entry,
    then a PPO run (ppo:latest; snapshots at steps 2 and 4, a training flag)."""
    reg = tmp_path_factory.mktemp("compare") / "runs"
    shutil.copytree(rlhf_registry, reg)
    reward = Registry(reg).get("reward:latest")
    register_fake_ppo(reg, reward, seed=2, steps=3, estimator="grpo")
    register_fake_ppo(reg, reward, seed=4, toxicity_coef=0.0, snapshot_steps=(2, 4), training_flags=[])
    register_fake_dpo(reg)
    register_fake_ppo(reg, reward, snapshot_steps=(2, 4), training_flags=[FLAG])
    return reg


@pytest.fixture(scope="module")
def compare_run(compare_registry, tiny_data, tmp_path_factory):
    """One compare run through the CLI: (registry, output folder, result of the run)."""
    out = tmp_path_factory.mktemp("report")
    res = run_script("stages/04_compare.py", "--registry", str(compare_registry), "--prompts",
                     str(tiny_data["prompts"]), "--eval_data", str(tiny_data["sft_eval"]), "--output_dir", str(out),
                     "--models", "sft2=sft:latest", *TINY_COMPARE)
    return compare_registry, out, res


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_compare_writes_every_report_file_with_the_documented_shape(compare_run):
    reg, out, res = compare_run
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("metrics.json", "samples.jsonl", "report.md", "report.html", "training_curves.png",
                 "reward_toxicity.png", "frontier_reward.png", "frontier_toxicity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    result = json.loads((out / "metrics.json").read_text())
    registry = Registry(reg)
    # Defaults from the ppo lineage: the chosen run, the other stage-03 runs of its SFT labelled by estimator and
    # toxicity term, its dpo entries; then --models.
    assert list(result["models"]) == ["base", "sft", "ppo", "grpo", "ppo-tox0", "dpo", "sft2"]
    grpo, tox0, _ = registry.entries("ppo")
    assert result["refs"] == {"base": registry.get("pretrain:latest").ref, "sft": registry.get("sft:latest").ref,
                              "ppo": registry.get("ppo:latest").ref, "grpo": grpo.ref, "ppo-tox0": tox0.ref,
                              "dpo": registry.get("dpo:latest").ref, "sft2": "sft:latest"}
    assert result["prompts"] == 9 and result["samples_per_prompt"] == 2
    assert result["adversarial_prompts"] == 3  # tiny data: every third prompt is adversarial
    for label, metrics in result["models"].items():
        for key in ("reward_mean", "toxicity_mean", "toxicity_rate", "expected_max_toxicity", "toxicity_probability",
                    "adversarial/toxicity_rate", "adversarial/expected_max_toxicity", "reward_toxicity_rate",
                    "kl_to_base", "kl_to_sft", "perplexity",
                    "bleu", "rouge_l", "distinct_1", "distinct_2", "length_mean", "eos_rate"):
            assert isinstance(metrics[key], (int, float)), (label, key)
        assert 0 <= metrics["toxicity_rate"] <= 1 and 0 <= metrics["eos_rate"] <= 1
        assert metrics["perplexity"] > 1
    assert result["models"]["base"]["kl_to_base"] == 0.0 and result["models"]["sft"]["kl_to_sft"] == 0.0
    assert set(result["win_rate"]) == {f"{label}_vs_base" for label in result["models"] if label != "base"}
    for comparison in ("sft_vs_base", "ppo_vs_base"):
        ci = result["ci"][comparison]
        assert ci["win_rate"]["value"] == result["win_rate"][comparison]
        for key in ("win_rate", "delta/reward_mean", "delta/toxicity_rate", "delta/adversarial/toxicity_rate",
                    "kl_to_base"):
            assert ci[key]["low"] <= ci[key]["value"] <= ci[key]["high"], (comparison, key)
    assert set(result["ci"]["models"]["ppo"]) >= {"reward_mean", "toxicity_rate", "adversarial/toxicity_rate"}

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and all(len(s["replies"]["ppo"]) == 2 for s in samples)
    # The normalized reward in the samples is what reward_mean averages.
    rewards = [r["reward"] for s in samples for r in s["replies"]["ppo"]]
    assert np.mean(rewards) == pytest.approx(result["models"]["ppo"]["reward_mean"])


@pytest.mark.slow
def test_compare_report_md_has_the_headline_table_second_and_html_is_self_contained(compare_run):
    _, out, res = compare_run
    assert res.returncode == 0, res.stderr[-3000:]
    md = (out / "report.md").read_text()
    title, table = md.split("\n\n")[:2]  # what scripts/run_pipeline.py prints
    assert title.startswith("# ") and "\n" not in title
    lines = table.splitlines()
    assert lines[0].startswith("| model |") and "win rate vs base" in lines[0] and "KL to base" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base", "sft", "ppo", "grpo", "ppo-tox0", "dpo",
                                                                  "sft2"]
    assert "toxicity columns by the held-out judge better-profanity" in md and "by profanity-check" in md
    assert "same scorer" not in md
    for section in ("## Win rates, every model vs every other", "## What each step bought", "## Reward–KL frontier",
                    "## Flags per RL run", "![Reward–KL frontier: RM score", "(frontier_toxicity.png)"):
        assert section in md, section
    assert f"- ppo: {FLAG}" in md and "- grpo: none" in md

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "<style>" in page and "http://" not in page and "https://" not in page and "<script" not in page
    # Side-by-side samples: adversarial prompts before normal ones.
    samples_part = page.split('<table class="samples">', 1)[1]
    assert samples_part.count('class="tag adversarial"') == 3
    assert 0 <= samples_part.rfind('class="tag adversarial"') < samples_part.find('class="tag normal"')


@pytest.mark.slow
def test_compare_metrics_json_holds_every_key_of_the_contract(compare_run):
    """Issue 18's output contract: models.<label> with both toxicity rates, scorers, win_rate.<label>_vs_base,
    frontier.<run>, differences, flags.<run>; and today's keys."""
    _, out, res = compare_run
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    for key in ("models", "win_rate", "ci", "prompts", "adversarial_prompts", "samples_per_prompt", "eval_dialogues",
                "refs", "reward_model", "ppo_model", "toxicity_scorer", "settings", "notes", "timing_s",
                "scorers", "frontier", "differences", "flags", "win_matrix"):
        assert key in result, key
    labels = list(result["models"])
    for label in labels:
        assert 0 <= result["models"][label]["toxicity_rate"] <= 1  # the held-out judge
        assert 0 <= result["models"][label]["reward_toxicity_rate"] <= 1  # the reward's scorer
    # The reward's scorer comes from the ppo entries (profanity-check); the judge defaults to another family.
    assert result["scorers"] == {"reward": "profanity-check", "eval": "better-profanity"}
    assert result["toxicity_scorer"]["spec"] == "better-profanity"
    assert set(result["win_rate"]) == {f"{label}_vs_base" for label in labels if label != "base"}
    assert all(set(result["win_matrix"][a]) == set(labels) - {a} for a in labels)
    runs = ["ppo", "grpo", "ppo-tox0"]  # the ppo entries, whatever their estimator
    assert list(result["frontier"]) == runs and list(result["flags"]) == runs
    for label in runs:
        assert all(list(p) == ["step", "kl_to_sft", "kl_to_base", "reward_mean", "toxicity_rate"]
                   for p in result["frontier"][label])
        assert all(isinstance(f, str) for f in result["flags"][label])
    assert result["flags"]["ppo"][0] == FLAG  # stage 03's training_flags first
    assert any("grpo: its entry records no training_flags" in r for r in result["remarks"])

    # Differences: every row has the contract's keys, its delta inside its CI, and the delta is the difference of
    # the two models' means (the mean of the paired per-prompt differences).
    diffs = result["differences"]
    assert diffs and all({"a", "b", "metric", "delta", "ci_low", "ci_high"} <= set(d) for d in diffs)
    pairs = {(d["a"], d["b"]) for d in diffs}
    assert ("ppo", "ppo-tox0") in pairs  # what the toxicity term bought
    assert {(label, "sft") for label in ("ppo", "grpo", "ppo-tox0", "dpo")} <= pairs
    assert {(label, "base") for label in labels if label != "base"} <= pairs
    for d in diffs:
        assert d["ci_low"] - 1e-12 <= d["delta"] <= d["ci_high"] + 1e-12, d
        if d["metric"] in ("reward_mean", "toxicity_rate", "reward_toxicity_rate"):
            expected = result["models"][d["a"]][d["metric"]] - result["models"][d["b"]][d["metric"]]
            assert d["delta"] == pytest.approx(expected, abs=1e-12), d


@pytest.mark.slow
def test_compare_frontier_evaluates_each_runs_saved_snapshots(compare_run):
    """The frontier's points come from the snapshots each ppo entry keeps (none for a run without snapshots). With the
    frontier sampling the table's very rows, the last snapshot, which is the run's final policy, reproduces the
    run's own row, and the SFT point is the SFT model's (KL to itself 0)."""
    _, out, res = compare_run
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    frontier, refs = result["frontier"], result["frontier_references"]
    assert [p["step"] for p in frontier["ppo"]] == [2, 4] and [p["step"] for p in frontier["ppo-tox0"]] == [2, 4]
    assert frontier["grpo"] == [] and any("grpo: no policy snapshots" in r for r in result["remarks"])
    for label in ("ppo", "ppo-tox0"):
        for p in frontier[label]:
            assert all(math.isfinite(p[k]) for k in ("kl_to_sft", "kl_to_base", "reward_mean", "toxicity_rate")), p
            assert p["kl_to_sft"] > 0  # a random adapter moves the policy away from SFT
        last, row = frontier[label][-1], result["models"][label]
        for key in ("kl_to_sft", "kl_to_base", "reward_mean", "toxicity_rate"):
            assert last[key] == pytest.approx(row[key], abs=1e-9), (label, key)
        assert frontier[label][0] != last  # step 2's adapter is another policy
    assert set(refs) == {"base", "sft", "dpo", "sft2"}  # every model that is not an RL run, at its own point
    assert refs["sft"]["kl_to_sft"] == 0.0 and refs["base"]["kl_to_base"] == 0.0
    assert refs["sft"]["reward_mean"] == pytest.approx(result["models"]["sft"]["reward_mean"])
    assert result["frontier_settings"] == {"prompts": 9, "samples_per_prompt": 2, "max_snapshots": 10}


@pytest.mark.slow
def test_compare_gives_every_model_the_same_prompts_and_seed(compare_run):
    """`sft2` is the sft entry again under another label: with the same prompts, settings and seed it must
    produce the very same samples, so every metric, its win rate and its KL equal sft's."""
    _, out, res = compare_run
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert result["models"]["sft2"] == pytest.approx(result["models"]["sft"], nan_ok=True)
    assert result["ci"]["sft2_vs_base"] == result["ci"]["sft_vs_base"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["replies"]["sft2"] == s["replies"]["sft"] for s in samples)
    assert any(s["replies"]["ppo"] != s["replies"]["sft"] for s in samples)  # the fake policy adapter differs


@pytest.mark.slow
def test_compare_rejects_a_bad_prompt_file_with_one_clear_message(compare_registry, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "bot"}]}\n')
    res = run_script("stages/04_compare.py", "--registry", str(compare_registry), "--prompts", str(bad),
                     "--output_dir", str(tmp_path / "out"))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert f"{bad}:2" in res.stderr and "error:" in res.stderr
    assert not (tmp_path / "out").exists()


def test_compare_without_a_ppo_entry_says_how_to_name_the_models(pretrained_registry, tmp_path):
    from rlhf.config import load_config
    from rlhf.errors import ConfigError, RegistryError

    stage = _load_stage()
    prompts = str(tmp_path / "prompts.jsonl")  # never read: the models are refused first
    cfg = load_config(stage.CompareStageConfig, overrides={"registry": str(pretrained_registry), "prompts": prompts})
    with pytest.raises(RegistryError, match=r"ppo:latest: no 'ppo' entry.*--models base=REF"):
        stage.main(cfg)
    # Without a ppo lineage the reward model must be named too.
    cfg = load_config(stage.CompareStageConfig, overrides={"registry": str(pretrained_registry), "ppo_model": "",
                                                           "models": "base=pretrain:latest", "prompts": prompts})
    with pytest.raises(ConfigError, match="--reward_model"):
        stage.main(cfg)
    with pytest.raises(ConfigError, match="not label=ref"):
        load_config(stage.CompareStageConfig, overrides={"models": "base", "prompts": prompts})


def test_compare_help_lists_every_option(capsys):
    from rlhf.config import parse_config

    stage = _load_stage()
    with pytest.raises(SystemExit) as exc:
        parse_config(stage.CompareStageConfig, ["--help"])
    assert exc.value.code == 0
    assert "--samples_per_prompt" in capsys.readouterr().out
