"""Shared pieces of the reliability suite (issue 8): registry snapshots, the clean-failure check, and the
interrupted-then-resumed stage runs that test_faults.py, test_registry_integrity.py and test_security.py read.

Every stage runs as a subprocess through its real command line. The interrupted runs carry a fake Hugging Face
token in their environment (`SECRET`), so test_security.py can check that it reached no file and no log.
Where the suite's time goes: the three interrupted runs (about half a minute each on 2 busy cores); each bad-input
case is one subprocess, a fraction of a second when the stage checks its input before importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, run_script  # tests/conftest.py
from test_ppo_stage import TINY_PPO
from test_stage00 import _DIE_AFTER_FIRST_CHECKPOINT as DIE_AFTER_FIRST_CHECKPOINT

SECRET = "hf_secret_for_test"
# One intra-op thread: the models are tiny, and on a busy 2-core machine a second thread only adds CPU time.
RUN_ENV = {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET, "OMP_NUM_THREADS": "1"}
LONG_PROMPT_WORDS = 400  # ~400 tokens: far beyond the tiny models' 64 positions

# Small runs that still checkpoint before they end: 4 steps, a checkpoint every 2.
SFT_ARGS = ["--model", "pretrain:latest", "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "8",
            "--gen_eval_samples", "0", "--logging_steps", "1", "--learning_rate", "1e-3"]
REWARD_ARGS = ["--model", "pretrain:latest", "--mode", "full", "--max_steps", "4", "--save_steps", "2",
               "--per_device_train_batch_size", "4", "--gradient_checkpointing", "false", "--learning_rate", "1e-3",
               "--logging_steps", "1"]
# 3 PPO steps of 8 episodes; no periodic checkpoint, so the only one is what SIGINT saves.
PPO_ARGS = [*TINY_PPO, "--total_episodes", "24", "--save_steps", "100"]


# ------------------------------------------------------------------------------------------ helpers


def copy_registry(src: Path, dst: Path) -> Path:
    """`cp -r SRC DST`, as a user copies a registry folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def listing(registry: Path) -> list[dict]:
    """`scripts/registry.py list --json`: every row as the CLI shows it."""
    res = run_script("scripts/registry.py", "list", "--registry", str(registry), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def verify(registry: Path) -> subprocess.CompletedProcess:
    return run_script("scripts/registry.py", "verify", "--registry", str(registry))


def leftovers(registry: Path) -> list[str]:
    """What a finished run must not leave behind: anything in `.work/` or `.staging/`."""
    return sorted(str(p.relative_to(registry)) for d in (".work", ".staging") for p in (registry / d).glob("*"))


def error_lines(stderr: str) -> list[str]:
    """`error: ...` lines of run_cli, and argparse's `PROG: error: ...`."""
    return [line for line in stderr.splitlines()
            if line.startswith("error:") or (".py: error:" in line and not line.startswith(" "))]


def assert_clean_failure(res: subprocess.CompletedProcess) -> str:
    """Non-zero exit, exactly one error message, no traceback; returns the whole stderr."""
    code = res.returncode
    assert code != 0, f"exit 0: the input was accepted; the run's stderr ends:\n{res.stderr[-1500:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(error_lines(res.stderr)) == 1, res.stderr[-3000:]
    return res.stderr


def write_long_prompts(path: Path, n: int, every: int = 1, base: Path | None = None) -> Path:
    """A prompt file whose every `every`-th prompt (of `base`'s, or all) is ~LONG_PROMPT_WORDS tokens long."""
    words = "hello how are you today fine thanks what is your name the weather".split()
    rows = [json.loads(line) for line in base.read_text().splitlines()][:n] if base else [None] * n
    for i in range(0, n, every):
        text = " ".join(words[(i + j) % len(words)] for j in range(LONG_PROMPT_WORDS))
        rows[i] = {"messages": [{"role": "user", "content": text}], "category": "normal"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ interrupted runs


@dataclass
class Interrupted:
    """A stage run interrupted after its first checkpoint, then rerun with --resume."""

    registry: Path  # where --resume ran and registered
    first: subprocess.CompletedProcess  # the interrupted run
    second: subprocess.CompletedProcess  # the --resume run
    rows_before: list[dict]
    rows_after_first: list[dict]
    checkpoints: list[str]  # checkpoint folders in .work/ after the interruption


def _kill_and_resume(stage: str, registry: Path, args: list[str], resume_in: Path | None = None) -> Interrupted:
    """Run `stage` so that it SIGKILLs itself right after its first complete checkpoint, then rerun it with
    --resume (in a `cp -r` copy of the registry when `resume_in` is given, the original deleted)."""
    argv = [stage, "--registry", str(registry), *args]
    rows_before = listing(registry)
    first = run_script("-c", DIE_AFTER_FIRST_CHECKPOINT, *argv, env=RUN_ENV)
    checkpoints = sorted(p.name for p in registry.glob(".work/*/checkpoint-*"))
    rows_after_first = listing(registry)
    if resume_in is not None:  # the registry moves to another disk / machine between the crash and the resume
        copy_registry(registry, resume_in)
        shutil.rmtree(registry)
        registry, argv = resume_in, [stage, "--registry", str(resume_in), *args]
    second = run_script(*argv, "--resume", env=RUN_ENV)
    return Interrupted(registry, first, second, rows_before, rows_after_first, checkpoints)


@pytest.fixture(scope="session")
def sft_killed_and_resumed(pretrained_registry, tiny_data, tmp_path_factory) -> Interrupted:
    reg = copy_registry(pretrained_registry, tmp_path_factory.mktemp("sft_fault") / "runs")
    return _kill_and_resume("stages/01_sft.py", reg, [*SFT_ARGS, "--data", str(tiny_data["sft"]),
                                                      "--eval_data", str(tiny_data["sft_eval"])])


@pytest.fixture(scope="session")
def reward_killed_and_resumed(pretrained_registry, tiny_data, tmp_path_factory) -> Interrupted:
    """Killed on one machine, resumed on another: the registry is `cp -r`'d elsewhere and the original deleted."""
    root = tmp_path_factory.mktemp("reward_fault")
    reg = copy_registry(pretrained_registry, root / "machine_a" / "runs")
    return _kill_and_resume("stages/02_reward.py", reg, [*REWARD_ARGS, "--data", str(tiny_data["pref"]),
                                                         "--eval_data", str(tiny_data["pref_eval"])],
                            resume_in=root / "machine_b" / "runs")


@pytest.fixture(scope="session")
def ppo_interrupted_and_resumed(rlhf_registry, tiny_data, tmp_path_factory) -> Interrupted:
    """PPO gets SIGINT (Ctrl-C) once its first step is logged, then is rerun with --resume.

    Every 4th prompt is longer than the model's whole context: PPO keeps the last `max_prompt_length`
    tokens of a prompt, so these runs also show that long prompts are truncated, not fatal.
    """
    root = tmp_path_factory.mktemp("ppo_fault")
    reg = copy_registry(rlhf_registry, root / "runs")
    prompts = write_long_prompts(root / "prompts.jsonl", 32, every=4, base=tiny_data["prompts"])
    argv = ["stages/03_ppo.py", "--registry", str(reg), "--data", str(prompts), *PPO_ARGS]
    rows_before = listing(reg)
    out, err = root / "first.out", root / "first.err"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=fo, stderr=fe,
                                env={**os.environ, **RUN_ENV})
        deadline = time.time() + 420
        while time.time() < deadline and proc.poll() is None:  # the event: step 1 is in metrics.jsonl
            logged = list(reg.glob(".work/ppo-*/metrics.jsonl"))
            if logged and logged[0].read_text().count("\n") >= 1:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    first = subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())
    checkpoints = sorted(p.name for p in reg.glob(".work/ppo-*/checkpoint-*"))
    rows_after_first = listing(reg)
    second = run_script(*argv, "--resume", env=RUN_ENV)
    return Interrupted(reg, first, second, rows_before, rows_after_first, checkpoints)


# ------------------------------------------------------------------------------------------ summary line

SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(line)
