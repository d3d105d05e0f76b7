"""scripts/bench_ppo.py and its package scripts/bench/ without the TRL virtualenv: its numbers against
hand-worked values, the child-process measurement, the option names both PPOs receive, and the JSON
summary's keys; for the critic-free part, the options both GRPO / RLOO sides receive and the TRL side's reward
functions against the reward ours computes.

No timing assertions: the machine running the suite is shared.
"""

from __future__ import annotations

import cProfile
import importlib.util
import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import ROOT, load_script, load_stage

sys.path.insert(0, str(ROOT / "scripts"))  # as when scripts/bench_ppo.py runs: scripts/ holds the package

from bench import critic_free, harness, parts, profiling, report, runs, setups, stats  # noqa: E402


peer = load_script("scripts/bench_trl_peer.py")
cf_peer = load_script("scripts/bench_trl_critic_free.py")


# ---------------------------------------------------------------- numbers


def test_median_mean_ratio_by_hand():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5  # (2 + 3) / 2
    assert stats.median([None, 5.0]) == 5.0  # a failed run (None) is left out
    assert stats.median([]) is None
    assert stats.mean([1.0, 2.0, 6.0]) == 3.0
    assert stats.ratio(1.0, 4.0) == 0.25
    assert stats.ratio(1.0, 0.0) is None and stats.ratio(None, 2.0) is None


def test_loglog_slope_recovers_the_exponent():
    # y = 3 x²: log y = 2 log x + log 3 exactly, so the least-squares slope is 2.
    assert stats.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    # y = 5 / x: slope −1.
    assert stats.loglog_slope([1, 10, 100], [5, 0.5, 0.05]) == pytest.approx(-1.0)
    # Points (1, 1), (2, 2), (4, 2): log2 x = 0, 1, 2; log2 y = 0, 1, 1;
    # slope = Σ(dx·dy) / Σdx² = ((-1)(-2/3) + 0 + (1)(1/3)) / 2 = 0.5.
    assert stats.loglog_slope([1, 2, 4], [1, 2, 2]) == pytest.approx(0.5)
    assert stats.loglog_slope([2], [3]) is None
    assert stats.loglog_slope([1, 2], [1, None]) is None  # a missing figure leaves one point


def test_quarter_means():
    assert stats.quarter_means([1, 2, 3, 4, 5, 6, 7, 8]) == (1.5, 7.5)  # quarter = 2 steps
    assert stats.quarter_means([4.0]) == (4.0, 4.0)
    assert stats.quarter_means([]) == (None, None)


def test_ours_steps_adds_the_eos_penalty_to_the_score_as_trl_reports_it():
    rows = [{"timing/rollout_s": 1.0, "timing/update_s": 0.5, "objective/score": 0.8, "response/eos_rate": 0.75,
             "objective/kl": 0.1, "response/length_mean": 12.0}]
    out = runs.ours_steps(rows, missing_eos_penalty=1.0)
    assert out["step_s"] == [1.5]
    assert out["score"] == [pytest.approx(0.55)]  # 0.8 − 1.0 · (1 − 0.75)
    assert out["kl"] == [0.1] and out["rollout_s"] == [1.0] and out["update_s"] == [0.5]


def test_trl_steps_differences_of_the_step_clock_and_metric_logs_only():
    result = {"step_end_s": [2.0, 5.0, 6.0],
              "logs": [{"objective/scores": 0.1, "objective/kl": 0.0}, {"objective/scores": 0.3, "objective/kl": 0.2},
                       {"objective/scores": 0.5, "objective/kl": 0.4}, {"train_runtime": 9.0}]}
    out = runs.trl_steps(result)
    assert out["step_s"] == [2.0, 3.0, 1.0]
    assert out["score"] == [0.1, 0.3, 0.5] and out["kl"] == [0.0, 0.2, 0.4]


def _run(impl, loop_s, rss, scores, steps=(2.0, 1.0, 1.0, 1.0), ok=True):
    return {"impl": impl, "label": "b", "ok": ok, "error": None if ok else "Boom: no", "loop_s": loop_s,
            "episodes": 64, "wall_s": loop_s + 10, "step_s": list(steps), "peak_rss_mb": rss,
            "peak_rss_above_baseline_mb": rss - 100, "score": scores, "kl": [0.0, 0.1, 0.2, 0.3]}


def test_compare_medians_means_and_ratios_by_hand():
    runs = [_run("ours", 4.0, 300, [0, 0, 0, 1]), _run("ours", 8.0, 500, [0, 0, 0, 2]),
            _run("ours", 6.0, 400, [0, 0, 0, 3]), _run("trl", 8.0, 800, [0, 0, 0, 1]),
            _run("trl", 12.0, 1000, [0, 0, 0, 1]), _run("trl", 0, 0, [], ok=False)]
    out = stats.compare(runs, batch_size=16, start_score=0.5)
    assert out["ours"]["loop_s_per_episode"] == pytest.approx(6.0 / 64)  # median of 4, 8, 6 s over 64 episodes
    assert out["trl"]["loop_s_per_episode"] == pytest.approx(10.0 / 64)  # median of 8, 12 (the failure left out)
    assert out["ratio_loop_s_per_episode"] == pytest.approx(0.6)
    assert out["ratio_peak_rss_mb"] == pytest.approx(400 / 900)
    assert out["ratio_peak_rss_above_baseline_mb"] == pytest.approx(300 / 800)
    assert out["ours"]["steady_s_per_episode"] == pytest.approx(1.0 / 16)  # steps after the first: median 1 s
    assert out["ours"]["score_last_quarter"] == pytest.approx(2.0)  # mean of 1, 2, 3
    assert out["ours"]["score_last_quarter_se"] == pytest.approx(1.0 / 3 ** 0.5)  # sd 1 over 3 seeds
    assert out["ours"]["score_gain"] == pytest.approx(1.5)  # last quarter − the SFT policy's start score
    assert out["ours"]["score_gain_within_run"] == pytest.approx(2.0)  # last quarter − first quarter
    assert out["ours"]["kl_last_quarter"] == pytest.approx(0.3)
    assert out["trl"]["runs_ok"] == 2 and out["trl"]["errors"] == ["Boom: no"]
    summary = {"mode": "quick", "threads": 1, "load_before": [1.0], "configs": {"b": out}}
    top = stats.headline(summary)
    assert top["wall_ratio_ours_over_trl"] == out["ratio_loop_s_per_episode"]
    assert top["peak_rss_ratio_ours_over_trl"] == out["ratio_peak_rss_mb"]
    assert top["gpt2_small_peak_rss_ratio_ours_over_trl"] is None  # that part did not run
    json.dumps(summary)  # the summary must be JSON
    md = report.markdown(summary)
    assert "| ours / TRL | 0.6 |" in md and "| 2 ± 0.577 | 1.5 ± 0.577 |" in md and "where gains start: 0.5" in md


# ---------------------------------------------------------------- child processes


def test_child_peak_rss_is_its_own_not_the_parents(tmp_path):
    """ru_maxrss would count the image a child was forked from; the small wrapper keeps it out."""
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: 300 MiB resident in this process
    small = harness.run_child([sys.executable, "-c", "pass"], {}, 60, tmp_path / "small.log")
    big = harness.run_child([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                          {}, 60, tmp_path / "big.log")
    del ballast
    assert small["rc"] == 0 and big["rc"] == 0
    assert small["peak_rss_mb"] < 150
    assert big["peak_rss_mb"] >= 200


def test_failed_child_gives_its_error_line(tmp_path):
    res = harness.run_child([sys.executable, "-c", "raise SystemExit('ValueError: bad shape')"], {}, 60,
                          tmp_path / "fail.log")
    assert res["rc"] == 1
    assert harness.last_error_line(res["log_tail"]) == "ValueError: bad shape"


def test_child_past_its_time_limit_is_killed(tmp_path):
    res = harness.run_child([sys.executable, "-c", "import time; time.sleep(60)"], {}, 1, tmp_path / "slow.log")
    assert res["rc"] != 0


# ---------------------------------------------------------------- what each PPO receives


def test_our_options_parse_and_give_batch_16():
    stage = load_stage("03_ppo.py")
    from rlhf.config import parse_config

    setup = setups.Setup(registry="r", prompts="p.jsonl", sft="sft:x", reward_adapter="reward:y",
                        reward_model="reward:z", rm_folder="f", rm_check_max_abs_diff=0.0)
    s = runs.Settings()
    cfg = parse_config(stage.PPOStageConfig, runs.ours_cmd(s, setup, sft="sft:x", reward="reward:y",
                                                            four_bit=True, seed=3))
    assert stage.derive_sizes(cfg, world_size=1).batch_size == s.batch_size == 16
    assert (cfg.num_ppo_epochs, cfg.num_mini_batches, cfg.response_length) == (2, 2, 32)
    assert cfg.toxicity_coef == 0 and cfg.load_in_4bit is True and cfg.seed == 3
    assert (cfg.learning_rate, cfg.kl_coef, cfg.missing_eos_penalty) == (s.learning_rate, s.kl_coef,
                                                                          s.missing_eos_penalty)


def test_peer_spec_holds_every_ppo_field_with_the_same_values():
    s = runs.Settings()
    spec = runs.trl_spec(s, [[1, 2]], sft_path="a", rm_path="b", policy_4bit=True, value="full",
                          reward_4bit=False, seed=0)
    assert set(peer.PPO_FIELDS) <= set(spec)
    # TRL: local_batch_size = per_device × grad. accum.; minibatch = that / num_mini_batches (8 rows, as ours).
    assert spec["per_device_train_batch_size"] * spec["gradient_accumulation_steps"] == s.batch_size
    for k in ("learning_rate", "kl_coef", "response_length", "num_ppo_epochs", "num_mini_batches", "total_episodes"):
        assert spec[k] == getattr(s, k)


def test_plans_and_cli_help():
    for quick in (True, False):
        pl = parts.plan(quick)
        assert len(pl["seeds"]["b"]) >= 3 and pl["lengths"] == [16, 32, 64, 128]
        assert set(pl["widths"]) <= set(setups.SETUP_WIDTHS) and 128 in pl["widths"]
        cf = pl["critic_free"]
        for cs in (critic_free.CriticFreeSettings(total_episodes=cf["episodes"]),
                   critic_free.CriticFreeSettings(**cf["gpt2"])):
            assert cs.steps >= 2  # a step after the first: the steady figures
            assert cs.batch_size % cs.num_generations == 0  # whole groups
            critic_free.ours_cmd(cs, _cf_setup(), "grpo", sft="s", reward="r", seed=0)  # minibatches split exactly
    assert set(parts.PARTS) >= {"compare", "gpt2", "scaling", "profile", "critic_free"}
    res = subprocess.run([sys.executable, "scripts/bench_ppo.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "--skip-peer" in res.stdout and "--quick" in res.stdout


# ---------------------------------------------------------------- profile plumbing


def test_profile_shares_splits_calls_by_caller(tmp_path):
    """Fake modules at paths ending like ours: the model forward (_mixed_hidden) is counted under the caller that
    made the call, the rollout's or the update's."""
    fake_dir = tmp_path / "rlhf" / "ppo"
    fake_dir.mkdir(parents=True)
    (fake_dir / "actor_critic.py").write_text(
        "def busy(n):\n    return sum(i * i for i in range(n))\n"
        "def _mixed_hidden(n):\n    return busy(n)\n"
        "def rollout_forward(n):\n    return _mixed_hidden(n) + busy(n // 10)\n"
        "def update_forward(n):\n    return _mixed_hidden(n) + busy(n // 10)\n"
        "def generate(n):\n    return busy(n)\n")
    (fake_dir / "rollout.py").write_text(
        "import actor_critic as ac\n"
        "def rollout():\n    ac.generate(200000); ac.rollout_forward(100000)\n")
    (fake_dir / "update.py").write_text(
        "import actor_critic as ac\n"
        "def ppo_update():\n    ac.update_forward(400000)\n")
    sys.path[:0] = [str(fake_dir)]
    try:
        fake = {name: load_script(fake_dir / f"{name}.py") for name in ("rollout", "update")}
        prof = cProfile.Profile()
        prof.runcall(lambda: (fake["rollout"].rollout(), fake["update"].ppo_update()))
        prof.dump_stats(str(tmp_path / "p.prof"))
    finally:
        del sys.path[:1]
        sys.modules.pop("actor_critic", None)
    out = profiling.profile_shares(tmp_path / "p.prof")
    sec, share = out["seconds"], out["share_of_loop"]
    assert set(sec) == set(profiling.PROFILED)
    assert sec["rollout/generate"] > 0 and sec["rollout/ref_value_reward/model"] > 0
    assert 0 < sec["rollout/ref_value_reward/model"] < sec["rollout/ref_value_reward"] <= sec["rollout"]
    assert 0 < sec["update/policy_value/model"] < sec["update/policy_value"] <= sec["update"]
    assert sec["update/policy_value/model"] > 2 * sec["rollout/ref_value_reward/model"], "callers mixed up"
    assert share["rollout"] + share["update"] == pytest.approx(1.0)
    assert not math.isnan(share["update/backward"])


def test_profiled_functions_are_where_the_table_looks_for_them():
    """Each PROFILED entry names a file that exists (in this repository, or in the installed torch) and defines
    the function, and its caller where one is given: a moved function would otherwise count as 0 s."""
    torch_dir = Path(importlib.util.find_spec("torch").submodule_search_locations[0])
    for name, (suffix, func, *caller) in profiling.PROFILED.items():
        path = ROOT / suffix if suffix.startswith("rlhf/") else torch_dir.parent / suffix
        assert path.is_file(), f"{name}: no {path}"
        source = path.read_text()
        for fn in (func, *caller):
            assert f"def {fn}(" in source, f"{name}: {suffix} defines no {fn}"


# ---------------------------------------------------------------- critic-free: GRPO / RLOO beside TRL 1.16


def _cf_setup():
    return setups.Setup(registry="r", prompts="p.jsonl", sft="sft:x", reward_adapter="reward:y",
                        reward_model="reward:z", rm_folder="f", rm_check_max_abs_diff=0.0)


@pytest.mark.parametrize("estimator", list(critic_free.ESTIMATORS))
def test_critic_free_options_parse_and_match_the_trl_side(estimator):
    stage = load_stage("03_ppo.py")
    from rlhf.config import parse_config

    cs = critic_free.CriticFreeSettings()
    cfg = parse_config(stage.PPOStageConfig, critic_free.ours_cmd(cs, _cf_setup(), estimator, sft="sft:x",
                                                                   reward="reward:y", seed=3))
    sizes = stage.derive_sizes(cfg, world_size=1)
    assert sizes.batch_size == cs.batch_size == 16 and sizes.prompts == 4 and cfg.num_generations == 4
    assert cfg.advantage_estimator == estimator and not cfg.critic
    assert (cfg.kl_in_loss, cfg.kl_estimator, cfg.loss_type) == {"grpo": (True, "k3", "dapo"),
                                                                 "rloo": (False, "k1", "dr_grpo")}[estimator]
    assert cfg.reward_funcs == ["rm", "toxicity"] and cfg.missing_eos_penalty == 0
    assert cfg.toxicity_coef == cs.toxicity_coef and cfg.max_grad_norm == cs.max_grad_norm

    spec = critic_free.trl_spec(cs, estimator, sft_path="a", reward_dir="b", prompts=[[]], prompt_ids=[[1]], seed=3)
    fields = cf_peer.CONFIG_FIELDS + (cf_peer.GRPO_FIELDS if estimator == "grpo" else ())
    assert set(fields) <= set(spec) and spec["trainer"] == estimator
    # TRL: one generation of per_device × steps_per_generation responses, num_iterations passes, one optimizer step
    # per per_device rows: the same responses per step, minibatches and optimizer steps as ours.
    assert spec["per_device_train_batch_size"] * spec["steps_per_generation"] == sizes.local_batch_size
    assert spec["per_device_train_batch_size"] == sizes.local_mini_batch_size
    assert spec["num_iterations"] == cfg.num_ppo_epochs
    assert spec["max_steps"] == sizes.num_total_batches * cfg.num_mini_batches * cfg.num_ppo_epochs  # 8 × 2 × 2
    assert (spec["beta"], spec["epsilon"], spec["max_completion_length"], spec["learning_rate"]) == (
        cfg.kl_coef, cfg.cliprange, cfg.response_length, cfg.learning_rate)
    from trl import GRPOConfig, RLOOConfig

    config = (GRPOConfig if estimator == "grpo" else RLOOConfig)(output_dir="unused", use_cpu=True, bf16=False,
                                                                 report_to=[], **{k: spec[k] for k in fields})
    assert config.beta == cs.kl_coef and config.num_generations == cfg.num_generations


def test_trl_side_samples_the_prompts_ours_samples_at_every_step():
    """TRL's sampler over the dataset `prompt_order` builds (unshuffled) gives each generation the prompts our stage
    samples at that step, each k times in a row, as our stage lays them out."""
    from trl.trainer.utils import RepeatSampler

    from rlhf.ppo.rollout import prompt_indices

    cs = critic_free.CriticFreeSettings(total_episodes=64)  # 4 steps of 4 prompts × 4 responses
    k, per_step = cs.num_generations, cs.batch_size // cs.num_generations
    order = critic_free.prompt_order(cs, n_prompts=10, seed=3)  # 10 prompts: the permutation wraps at step 2
    sampler = RepeatSampler(order, mini_repeat_count=k, batch_size=per_step, shuffle=False,
                            repeat_count=cs.num_ppo_epochs * cs.num_mini_batches)  # as GRPOTrainer builds it
    rows = [order[i] for i in sampler]  # the dataloader's rows; a generation reads the first batch_size of its block
    block = cs.batch_size * cs.updates_per_step
    for step in range(cs.steps):
        ours = [i for i in prompt_indices(step, 0, batch_size=per_step, local_batch_size=per_step, n_prompts=10,
                                          seed=3) for _ in range(k)]  # as stages/03_ppo.py's loop
        assert rows[step * block:step * block + cs.batch_size] == ours


def test_critic_free_series_by_hand():
    rows = [{"timing/rollout_s": 1.0, "timing/update_s": 0.5, "objective/score": 0.3, "objective/kl": 2.0,
             "response/length_mean": 8.0, "loss/kl": 0.01}]
    grpo, rloo = critic_free.ours_series(rows, "grpo"), critic_free.ours_series(rows, "rloo")
    assert grpo["step_s"] == [1.5] and grpo["score"] == [0.3]
    assert grpo["kl"] == [0.01]  # the update's k3 per token
    assert rloo["kl"] == [0.25]  # k1 summed per response / mean length = per token: 2.0 / 8
    # Two rollouts of two optimizer steps each; the score is logged at each rollout's first step.
    out = {"step_end_s": [1.0, 1.5, 3.0, 3.25],
           "logs": [{"entropy": 1, "kl": 0.0, "rewards/rm_score/mean": 0.1, "completions/mean_length": 9.0},
                    {"entropy": 1, "kl": 0.2}, {"entropy": 1, "kl": 0.4, "rewards/rm_score/mean": 0.5,
                                                "completions/mean_length": 7.0},
                    {"entropy": 1, "kl": 0.6}, {"train_runtime": 3.3}]}
    trl = critic_free.trl_series(out, updates_per_step=2)
    assert trl["step_s"] == [1.5, 1.75] and trl["score"] == [0.1, 0.5]
    assert trl["kl"] == [pytest.approx(0.1), pytest.approx(0.5)] and trl["response_length"] == [9.0, 7.0]


def test_headline_and_tables_of_the_critic_free_part():
    runs_ = [_run("ours", 4.0, 300, [0, 0, 0, 1]), _run("trl", 10.0, 500, [0, 0, 0, 2])]
    cmp = stats.compare(runs_, batch_size=16)  # loop 4/64 against 10/64 s per episode: 0.4; memory 0.6
    cs = asdict(critic_free.CriticFreeSettings())
    summary = {"mode": "quick", "threads": 1, "load_before": [1.0],
               "critic_free": {"settings": {"tiny": cs, "gpt2_small": cs},
                               "kl_figures": {e: m["kl"] for e, m in critic_free.ESTIMATORS.items()},
                               "tiny": {"grpo": stats.compare(runs_, 16, start_score=0.5)},
                               "gpt2_small": {"grpo": cmp, "rloo": cmp}}}
    top = stats.headline(summary)
    assert top["grpo_wall_ratio_ours_over_trl"] == pytest.approx(0.4)
    assert top["grpo_peak_rss_ratio_ours_over_trl"] == pytest.approx(0.6)
    assert top["rloo_wall_ratio_ours_over_trl"] == pytest.approx(0.4)
    assert top["wall_ratio_ours_over_trl"] is None  # the PPO parts did not run
    assert stats.headline({})["grpo_wall_ratio_ours_over_trl"] is None  # nor this one
    md = report.markdown(summary)
    assert "**GRPO, tiny model" in md and "**RLOO, GPT-2-small shape" in md and "| TRL 1.16 |" in md
    assert "| ours / TRL | 0.4 |" in md and "where gains start: 0.5" in md


def test_trl_reward_functions_give_what_ours_computes(rlhf_registry):
    """The TRL side's rm_score and toxicity functions, given TRL's arguments, return our reward's components for
    the same rows: the rollout's reward forward on the 4-bit base (normalized by the entry's statistics) and
    −toxicity_coef × our scorer."""
    import torch

    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.ppo.rewards import rm_score
    from rlhf.registry import Registry
    from rlhf.safety import load_scorer
    from rlhf.sequences import left_pad, right_pad

    reg = Registry(rlhf_registry)
    sft, rm = reg.get("sft:latest"), reg.get("reward:latest")
    tok = load_tokenizer(str(sft.path))
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "how are you doing"}],
               [{"role": "user", "content": "tell me a story"}]]
    prompt_ids = encode_prompts(tok, prompts, 128)
    words = ["thanks a lot", "damn you", "a b c d e f"]
    completion_ids = [tok(w, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for w in words[:2]]
    completion_ids.append(tok(words[2], add_special_tokens=False)["input_ids"])  # cut off: no EOS
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)  # as TRL decodes
    spec = {"sft_path": str(sft.path), "reward_dir": str(rm.path), "reward_mean": 0.25, "reward_std": 2.0,
            "toxicity": "profanity-check", "toxicity_coef": 2.0}
    rm_fn, tox_fn = cf_peer.reward_funcs(spec)
    kwargs = dict(prompts=prompts, completions=[[{"role": "assistant", "content": t}] for t in texts],
                  completion_ids=completion_ids, bench_prompt_ids=prompt_ids)
    got_rm, got_tox = rm_fn(**kwargs), tox_fn(**kwargs)

    # Ours: the rows as the rollout lays them out (left-padded prompt, right-padded response) through the fused
    # reference + reward forward of a critic-free actor-critic on the 4-bit base.
    ac = build_actor_critic(str(sft.path), tok, load_in_4bit=True, lora_r=4, lora_alpha=8,
                            lora_target_modules="all-linear", reward_dir=rm.path, separate_reward=None,
                            device=torch.device("cpu"), fuse_roles=True, critic=False)
    ids, pmask = left_pad(prompt_ids, tok.pad_token_id)
    resp, rmask = right_pad(completion_ids, tok.pad_token_id)
    _, _, raw = ac.rollout_forward(torch.cat([ids, resp], 1), torch.cat([pmask, rmask], 1), resp.shape[1])
    want_rm = rm_score(raw, 0.25, 2.0)
    assert got_rm == pytest.approx(want_rm.tolist(), abs=1e-4)
    want_tox = -2.0 * torch.tensor(load_scorer("profanity-check").score(texts), dtype=torch.float64)
    assert got_tox == pytest.approx(want_tox.tolist(), abs=1e-6)
    assert len(set(got_rm)) == 3  # three different rows: a mix-up of rows would show
