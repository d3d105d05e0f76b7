"""A pinned reference run: the tiny pipeline 00 -> 04 through the real command lines, its numbers against
tests/reference/tiny_pipeline.json.

What runs: stage 00 (pretrain) and 01 (sft) are the session fixtures `pretrained_registry` / `rlhf_registry`
(conftest.py: TINY_PRETRAIN; sft `--max_steps 2`); this test adds stage 02 (a QLoRA reward adapter on that SFT
model, as the demo does), 03 (PPO against it, the reward adapter sharing the 4-bit base) and 04 (compare base,
sft and ppo). Stages 02-04 run with one thread (OMP_NUM_THREADS=1), as `make demo` runs them.

What is compared: every registered metric of each stage's entry, PPO's per-step metrics (its metrics.jsonl: the
trajectory, not only the last step), and stage 04's headline numbers (metrics.json: each model's metrics and the
win rates). Left out, because they are not the same from one run to the next: wall-clock numbers (PPO's
`timing/*` and `episodes_per_s`, stage 04's `timing_s`), and everything that names an entry (refs, ids, paths).
Running the pipeline twice gives the same value for every other number, bit for bit.

Tolerances: an integer (steps, counts, parameters) must be equal; a float must satisfy
|got - want| <= ABS_TOL + REL_TOL * |want|, ABS_TOL = 1e-3, REL_TOL = 1e-2; PPO's clip fractions (`*clipfrac`)
get CLIPFRAC_TOL = 0.02 absolute. Why: changing only the order of float summation (stages 02-04 on 2 threads
instead of 1, a stand-in for another x86 CPU's SIMD width and BLAS kernels) moved this run's numbers by at most
1.5e-7, and those of a variant of it (another SFT model) by up to 1.6e-4 absolute (reward-model scores; 0.3% of
a value near 0.03); ABS_TOL is ~6x the larger. A clip fraction counts tokens on either side of a threshold, and
the 2-thread run moved one token across it (val/clipfrac 0 -> 1/128): CLIPFRAC_TOL allows ~2 tokens. A change of
the trajectory moves far more: 10% more PPO learning rate moves 25 of these numbers beyond the tolerance (the
final `objective/kl` by 55%, stage 04's ppo `reward_mean` from 0.007 to 0.084), 10% more reward-model learning
rate 30 of them; a changed seed, data order, loss or advantage computation changes the sampled responses and
with them nearly every number.

When the numbers move on purpose (a deliberate change of a stage, its defaults, or of a library):

    RLHF_UPDATE_REFERENCE=1 .venv/bin/python -m pytest tests/test_reference_run.py

rewrites the file from this run and then FAILS, saying so: an update is never silent, and a CI job that happens
to have the variable set cannot pass. Review `git diff tests/reference/tiny_pipeline.json`, commit it, and rerun
without the variable.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, TINY_PRETRAIN, run_script
from rlhf.registry import Registry

REFERENCE = ROOT / "tests" / "reference" / "tiny_pipeline.json"
UPDATE_VAR = "RLHF_UPDATE_REFERENCE"
UPDATE_CMD = f"{UPDATE_VAR}=1 .venv/bin/python -m pytest tests/test_reference_run.py"
ABS_TOL, REL_TOL = 1e-3, 1e-2
CLIPFRAC_TOL = 0.02
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

REWARD_ARGS = ["--model", "sft:latest", "--mode", "qlora", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
               "--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "2e-3",
               "--gradient_checkpointing", "false", "--save_steps", "100"]
# 4 steps of 8 episodes, 2 PPO epochs of 2 minibatches each.
PPO_ARGS = ["--total_episodes", "32", "--per_device_train_batch_size", "4", "--num_mini_batches", "2",
            "--num_ppo_epochs", "2", "--response_length", "8", "--max_prompt_length", "32", "--toxicity",
            "profanity-check", "--learning_rate", "5e-3", "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "100"]
COMPARE_ARGS = ["--max_prompts", "9", "--samples_per_prompt", "2", "--max_new_tokens", "8", "--max_eval_dialogues", "4",
                "--bootstrap_resamples", "200", "--toxicity", "profanity-check", "--num_threads", "1"]


def _untimed(key: str) -> bool:
    """False for the wall-clock numbers (module docstring)."""
    return not (key == "timing_s" or key.startswith("timing/") or key == "episodes_per_s")


def _kept(metrics: dict) -> dict:
    return {k: v for k, v in sorted(metrics.items()) if _untimed(k)}


def _run_pipeline(rlhf_registry: Path, tiny_data: dict[str, Path], tmp_path: Path) -> tuple[dict, dict]:
    """Stages 02-04 on a copy of the fixture registry: (the numbers the reference holds, nested by stage; the
    library versions the registry recorded)."""
    reg = tmp_path / "runs"
    shutil.copytree(rlhf_registry, reg)
    registry = Registry(reg)

    def stage(script: str, *args: str) -> None:
        res = run_script(script, "--registry", str(reg), *args, env=ONE_THREAD)
        assert res.returncode == 0, f"{script} exited {res.returncode}:\n{res.stderr[-3000:]}"

    stage("stages/02_reward.py", "--data", str(tiny_data["pref"]), "--eval_data", str(tiny_data["pref_eval"]),
          *REWARD_ARGS)
    reward = registry.get("reward:latest")  # the fixture's fake reward entry is older
    stage("stages/03_ppo.py", "--data", str(tiny_data["prompts"]), "--reward_model", reward.ref, *PPO_ARGS)
    ppo = registry.get("ppo:latest")
    out = tmp_path / "report"
    stage("stages/04_compare.py", "--prompts", str(tiny_data["prompts"]), "--eval_data", str(tiny_data["sft_eval"]),
          "--output_dir", str(out), *COMPARE_ARGS)

    report = json.loads((out / "metrics.json").read_text())
    steps = [json.loads(line) for line in (ppo.path / "metrics.jsonl").read_text().splitlines()]
    return {
        "pretrain": _kept(registry.get("pretrain:latest").metrics),
        "sft": _kept(registry.get("sft:latest").metrics),
        "reward": _kept(reward.metrics),
        "ppo": _kept(ppo.metrics),
        "ppo_steps": {str(row["step"]): _kept(row) for row in steps},
        "compare": {"models": {label: _kept(m) for label, m in report["models"].items()},
                    "win_rate": dict(sorted(report["win_rate"].items()))},
    }, ppo.versions


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(key: str, want: object, got: object) -> bool:
    if isinstance(want, bool) or isinstance(got, bool) or not isinstance(want, (int, float)) \
            or not isinstance(got, (int, float)):
        return want == got
    if isinstance(want, int) and isinstance(got, int):
        return want == got
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    if key.endswith("clipfrac"):
        return abs(got - want) <= CLIPFRAC_TOL
    return abs(got - want) <= ABS_TOL + REL_TOL * abs(want)


def _differences(want: dict, got: dict) -> list[str]:
    """One readable line per metric that moved, appeared or disappeared."""
    w, g = _flatten(want), _flatten(got)
    lines = []
    for key in sorted(w.keys() | g.keys()):
        if key not in g:
            lines.append(f"  {key:55s} gone (reference {w[key]!r})")
        elif key not in w:
            lines.append(f"  {key:55s} new: {g[key]!r} (not in the reference)")
        elif not _same(key, w[key], g[key]):
            a, b = w[key], g[key]
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
                rel = abs(b - a) / abs(a) if a else math.inf
                lines.append(f"  {key:55s} {a:>14.6g} -> {b:<14.6g} (abs {abs(b - a):.3g}, rel {rel:.3g})")
            else:
                lines.append(f"  {key:55s} {a!r} -> {b!r}")
    return lines


def _stage_args() -> dict[str, str]:
    """The arguments the reference was made with, as the file records them (one line per stage)."""
    return {"pretrain": " ".join(TINY_PRETRAIN), "reward": " ".join(REWARD_ARGS), "ppo": " ".join(PPO_ARGS),
            "compare": " ".join(COMPARE_ARGS)}


def _write_reference(metrics: dict, versions: dict) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    doc = {
        "about": "Numbers of the tiny reference pipeline (tests/test_reference_run.py, which says what is left out "
                 f"and the tolerances). Regenerate on purpose only: {UPDATE_CMD}",
        "generated_on": {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu,
                         "libraries": versions},
        "args": _stage_args(),
        "metrics": metrics,
    }
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


@pytest.mark.slow
def test_tiny_pipeline_reproduces_the_pinned_reference_numbers(rlhf_registry, tiny_data, tmp_path):
    """Stages 00 -> 04 on tiny data and tiny configs reproduce the committed numbers within rounding tolerance: a
    change anywhere that moves a training trajectory or an evaluation (a loss, the advantages, a default, the data
    order, the sampling) shows as a named metric that moved. Tolerances and exclusions: module docstring."""
    metrics, versions = _run_pipeline(rlhf_registry, tiny_data, tmp_path)
    rel = REFERENCE.relative_to(ROOT)
    if os.environ.get(UPDATE_VAR):
        _write_reference(metrics, versions)
        pytest.fail(f"{UPDATE_VAR} is set: rewrote {rel} from this run. Review `git diff {rel}`, commit it, and rerun "
                    f"without {UPDATE_VAR} (this test fails whenever it rewrites the file, so that no update goes "
                    f"unnoticed).", pytrace=False)
    assert REFERENCE.is_file(), f"{rel} is missing; generate it with: {UPDATE_CMD}"
    reference = json.loads(REFERENCE.read_text())

    args_now = _stage_args()
    stale_args = [k for k in args_now if reference["args"].get(k) != args_now[k]]
    moved = _differences(reference["metrics"], metrics)
    if moved or stale_args:
        then = reference["generated_on"]["libraries"]
        changed_libs = [f"{n} {then.get(n)} -> {versions.get(n)}" for n in sorted(then.keys() | versions.keys())
                        if then.get(n) != versions.get(n)]
        msg = [f"the tiny pipeline's numbers differ from {rel} (tolerance: abs {ABS_TOL} + "
               f"rel {REL_TOL}; clip fractions abs {CLIPFRAC_TOL}; integers exact):", *moved]
        if stale_args:
            msg.append(f"the stage arguments of this test changed since the reference was written: {stale_args}")
        if changed_libs:
            msg.append("libraries changed since the reference was written: " + ", ".join(changed_libs))
        msg.append(f"If this change is intended, regenerate the reference and commit it: {UPDATE_CMD}")
        pytest.fail("\n".join(msg), pytrace=False)


def test_the_reference_comparison_names_what_moved_and_forgives_only_rounding():
    """The comparison itself (no pipeline run): rounding-sized float differences pass; a moved float, a changed
    integer, a clip fraction off by more than ~2 tokens, a metric gone or new are each reported on their own line,
    with the stage and metric name."""
    want = {"ppo": {"objective/kl": 0.05, "steps": 4, "val/clipfrac": 0.0, "loss/policy": -0.0032},
            "compare": {"models": {"ppo": {"reward_mean": 0.35, "perplexity": float("nan")}}}}
    rounding = {"ppo": {"objective/kl": 0.05 + 2e-4, "steps": 4, "val/clipfrac": 1 / 128, "loss/policy": -0.0032001},
                "compare": {"models": {"ppo": {"reward_mean": 0.35 - 1.6e-4, "perplexity": float("nan")}}}}
    assert _differences(want, rounding) == []
    moved = {"ppo": {"objective/kl": 0.055, "steps": 5, "val/clipfrac": 3 / 128, "entropy": 5.7},
             "compare": {"models": {"ppo": {"reward_mean": 0.36, "perplexity": 250.0}}}}
    lines = _differences(want, moved)
    assert [line.split()[0] for line in lines] == [
        "compare.models.ppo.perplexity", "compare.models.ppo.reward_mean", "ppo.entropy", "ppo.loss/policy",
        "ppo.objective/kl", "ppo.steps", "ppo.val/clipfrac"]
    assert "new: 5.7" in lines[2] and "gone" in lines[3] and "0.05 -> 0.055" in lines[4], lines
