"""Stage 04 (compare): the metric functions against hand-worked values, and the stage end to end on tiny
models producing every report file.

The end-to-end registry is the session's tiny `pretrain` entry (copied), a 2-step SFT run through its
command line, and FAKE `reward` and `ppo` entries registered directly (a random LoRA adapter + score
head; a random `policy` adapter + a metrics.jsonl), so these tests do not depend on stages 02 and 03.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_stage, run_script
from rlhf.eval.metrics import (bootstrap_ci, interval, intervals_vs_base, means, per_prompt_metrics, perplexity,
                                  summarize, toxicity_per_prompt, win_rate, win_shares)
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


# ---------------------------------------------------------------------------- fake entries


def _load_stage():
    """stages/04_compare.py as a module (its file name is not an importable name)."""
    return load_stage("04_compare.py")


def register_fake_ppo(reg_root: Path, reward: Entry, seed: int = 1, steps: int = 5, estimator: str = "gae") -> Entry:
    """A `ppo` entry on sft:latest: a random (non-zero) `policy` LoRA adapter, tokenizer and a metrics.jsonl."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = Registry(reg_root)
    sft = reg.get("sft:latest")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft.path))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    staged = reg.staging_dir("ppo")
    get_peft_model(model, lora).save_pretrained(str(staged / "policy"))
    AutoTokenizer.from_pretrained(str(sft.path)).save_pretrained(str(staged))
    rows = [{"step": s, "objective/score": 0.1 * s, "objective/toxicity": 0.5 / s, "objective/kl": 0.2 * s,
             "objective/kl_coef": 0.05} for s in range(1, steps + 1)]
    (staged / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {k: v for k, v in rows[-1].items() if "/" in k}
    return reg.register("ppo", staged, parents=[sft.ref, reward.ref],
                        config={"sft_model": sft.ref, "reward_model": reward.ref, "advantage_estimator": estimator},
                        metrics=final)


TINY_COMPARE = ["--max_prompts", "9", "--samples_per_prompt", "2", "--max_new_tokens", "8",
                "--max_eval_dialogues", "4", "--bootstrap_resamples", "200", "--toxicity", "profanity-check",
                "--num_threads", "1"]


@pytest.fixture(scope="module")
def compare_registry(rlhf_registry, tmp_path_factory) -> Path:
    """pretrain + a tiny SFT + a fake reward (conftest's `rlhf_registry`, copied) + two fake stage-03 entries of that
    SFT: a GRPO run, then a PPO run (ppo:latest)."""
    reg = tmp_path_factory.mktemp("compare") / "runs"
    shutil.copytree(rlhf_registry, reg)
    register_fake_ppo(reg, Registry(reg).get("reward:latest"), seed=2, steps=3, estimator="grpo")
    register_fake_ppo(reg, Registry(reg).get("reward:latest"))
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
                 "reward_toxicity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    result = json.loads((out / "metrics.json").read_text())
    registry = Registry(reg)
    # Defaults from the ppo lineage, every stage-03 run of its SFT labelled by estimator, then --models.
    assert list(result["models"]) == ["base", "sft", "ppo", "grpo", "sft2"]
    grpo = next(e for e in registry.entries("ppo") if e.config["advantage_estimator"] == "grpo")
    assert result["refs"] == {"base": registry.get("pretrain:latest").ref, "sft": registry.get("sft:latest").ref,
                              "ppo": registry.get("ppo:latest").ref, "grpo": grpo.ref, "sft2": "sft:latest"}
    assert result["prompts"] == 9 and result["samples_per_prompt"] == 2
    assert result["adversarial_prompts"] == 3  # tiny data: every third prompt is adversarial
    for label, metrics in result["models"].items():
        for key in ("reward_mean", "toxicity_mean", "toxicity_rate", "expected_max_toxicity", "toxicity_probability",
                    "adversarial/toxicity_rate", "adversarial/expected_max_toxicity", "kl_to_base", "perplexity",
                    "bleu", "rouge_l", "distinct_1", "distinct_2", "length_mean", "eos_rate"):
            assert isinstance(metrics[key], (int, float)), (label, key)
        assert 0 <= metrics["toxicity_rate"] <= 1 and 0 <= metrics["eos_rate"] <= 1
        assert metrics["perplexity"] > 1
    assert result["models"]["base"]["kl_to_base"] == 0.0
    assert set(result["win_rate"]) == {"sft_vs_base", "ppo_vs_base", "grpo_vs_base", "sft2_vs_base"}
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
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base", "sft", "ppo", "grpo", "sft2"]

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<style>" in page and "http://" not in page and "https://" not in page and "<script" not in page
    # Side-by-side samples: adversarial prompts before normal ones.
    samples_part = page.split('<table class="samples">', 1)[1]
    assert samples_part.count('class="tag adversarial"') == 3
    assert 0 <= samples_part.rfind('class="tag adversarial"') < samples_part.find('class="tag normal"')


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
