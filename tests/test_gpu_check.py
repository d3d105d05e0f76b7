"""scripts/gpu_check.sh on a machine without a GPU, which is how CI runs it: `--dry-run` runs every check's CPU
stand-in and prints the table; the stage commands it would run parse with each stage's own config (so a renamed
field fails here, not on the GPU); a failing check and a spent budget show in the table and the exit code; without
CUDA the real check stops at once with one line."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECKS = ["cuda", "tests", "pipeline", "ppo-fused", "entries", "bench-gpt2"]
STAGES = {"pretrain": "stages/00_pretrain.py", "sft": "stages/01_sft.py", "reward": "stages/02_reward.py",
          "ppo": "stages/03_ppo.py", "compare": "stages/04_compare.py"}


def gpu_check(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", python, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env={k: v for k, v in os.environ.items() if k != "RLHF_DEVICE"})


def table(stdout: str) -> list[tuple[str, str, float]]:
    """The rows (check, status, seconds) of the table the script prints."""
    lines = stdout.splitlines()
    start = lines.index(next(x for x in lines if re.fullmatch(r"check\s+status\s+seconds", x)))
    rows = []
    for line in lines[start + 1:]:
        m = re.fullmatch(r"(\S+)\s+(.+?)\s+(\d+\.\d)", line)
        if not m:
            break
        rows.append((m[1], m[2], float(m[3])))
    return rows


def stage_commands(log: Path) -> dict[str, list[str]]:
    """`=== STAGE: path args...` lines that run_pipeline.py --dry-run printed into a check's log."""
    out = {}
    for line in log.read_text().splitlines():
        m = re.fullmatch(r"=== (\w+): (\S+) (.*)", line)
        if m and m[1] in STAGES:
            assert m[2].endswith(STAGES[m[1]])
            out[m[1]] = shlex.split(m[3])
    return out


def parsed(stage: str, argv: list[str]):
    """The stage's own config class (the type of its main's `cfg`) parsing the command's options."""
    from rlhf.config import parse_config

    module = load_script(STAGES[stage], reuse=True)
    cls = typing.get_type_hints(module.main)["cfg"]
    try:
        return parse_config(cls, argv)
    except SystemExit:  # argparse's exit on an unknown option; its message is on stderr
        pytest.fail(f"{STAGES[stage]} refuses the options gpu_check.sh gives it: {shlex.join(argv)}")


def test_dry_run_runs_every_stand_in_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the stage commands name their configs relative to the repository
    res = gpu_check("--dry-run", "--work", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = table(res.stdout)
    assert [(name, status) for name, status, _ in rows] == [(c, "dry-run ok") for c in CHECKS]
    assert res.stdout.rstrip().splitlines()[-1].startswith("gpu_check: all 6 checks passed (dry run")

    would = [x.strip()[len("would run: "):] for x in res.stdout.splitlines() if x.strip().startswith("would run: ")]
    assert any("RLHF_DEVICE=cuda" in x and "-m device tests" in x for x in would)
    assert any("bench_ppo.py --quick --skip-peer --parts gpt2" in x for x in would)
    assert "1/" in (tmp_path / "logs" / "tests.log").read_text()  # the device tests' selection is not empty
    assert "NF4 matmul in float32 ok" in (tmp_path / "logs" / "cuda.log").read_text()

    plain = stage_commands(tmp_path / "logs" / "pipeline.log")
    fused = stage_commands(tmp_path / "logs" / "ppo-fused.log")
    assert list(plain) == list(STAGES) and list(fused) == ["ppo"]
    cfgs = {stage: parsed(stage, argv) for stage, argv in plain.items()}
    assert cfgs["pretrain"].max_steps == 120 and cfgs["sft"].max_steps == 60 and cfgs["reward"].max_steps == 60
    assert cfgs["reward"].mode == "qlora" and cfgs["ppo"].load_in_4bit  # what the GPU's 4-bit kernels run
    assert cfgs["compare"].max_prompts == 24
    fused_ppo = parsed("ppo", fused["ppo"])
    assert (cfgs["ppo"].fuse_roles, fused_ppo.fuse_roles) == (False, True)
    assert cfgs["ppo"].total_episodes == fused_ppo.total_episodes == 256
    assert all(str(tmp_path / "runs") == c.registry for c in [*cfgs.values(), fused_ppo])


def test_a_failing_check_shows_in_the_table_and_the_exit_code(tmp_path):
    """A Python that fails the CUDA smoke test (exit 3) and runs everything else: the table names it, the others
    still run, the last line says which failed, the exit is 1."""
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *bitsandbytes*) exit 3;; esac\nexec {shlex.quote(sys.executable)} "$@"\n')
    shim.chmod(0o755)
    res = gpu_check("--dry-run", "--work", str(tmp_path / "work"), python=str(shim))
    assert res.returncode == 1
    rows = {name: status for name, status, _ in table(res.stdout)}
    assert rows == {**{c: "dry-run ok" for c in CHECKS}, "cuda": "FAILED (exit 3)"}
    assert res.stderr.rstrip().splitlines()[-1].startswith("gpu_check: FAILED: cuda (1 of 6 checks;")


def test_a_spent_budget_runs_nothing_and_fails(tmp_path):
    res = gpu_check("--dry-run", "--budget", "0", "--work", str(tmp_path))
    assert res.returncode == 1
    assert [status for _, status, _ in table(res.stdout)] == ["not run: budget spent"] * len(CHECKS)
    assert list((tmp_path / "logs").iterdir()) == []


def test_bad_options_are_refused():
    for args, needle in ((["--frobnicate"], "unknown option '--frobnicate'"), (["--budget", "8m"], "not a whole")):
        res = gpu_check(*args)
        assert res.returncode == 2 and needle in res.stderr and res.stdout == ""


def test_without_cuda_it_stops_at_once_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real check would run")
    res = gpu_check("--work", str(tmp_path))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == [res.stderr.strip()]  # one line
    assert res.stderr.startswith("gpu_check: FAILED: CUDA requested but none is available (torch ")
    assert "torch.cuda.is_available() is False" in res.stderr
    assert list((tmp_path / "logs").iterdir()) == []  # no check ran


def test_pipeline_overrides_go_to_their_stage_and_malformed_ones_are_refused():
    """scripts/run_pipeline.py --override, which the pipeline checks use."""
    from rlhf.errors import ConfigError

    runner = load_script("scripts/run_pipeline.py", reuse=True)
    stages = {"sft": "configs/demo/sft.yaml", "ppo": "configs/demo/ppo.yaml"}
    got = runner.stage_overrides(["ppo:fuse_roles=true", "sft:max_steps=2", "ppo:total_episodes=8"], stages)
    assert got == {"ppo": ["--fuse_roles", "true", "--total_episodes", "8"], "sft": ["--max_steps", "2"]}
    with pytest.raises(ConfigError, match="expected STAGE:FIELD=VALUE"):
        runner.stage_overrides(["ppo:fuse_roles"], stages)
    with pytest.raises(ConfigError, match="no stage 'reward' in the config; it has sft, ppo"):
        runner.stage_overrides(["reward:max_steps=2"], stages)
