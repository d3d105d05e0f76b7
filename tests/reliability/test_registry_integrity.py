"""The registry seen through the stages (issue 8), beyond tests/test_registry.py.

tests/test_registry.py already covers, on the `Registry` class and `scripts/registry.py`: verify naming the
entry and file of a modified or missing artifact, refusal on `get`, 4 concurrent writers, a registry from
the future, a crash between rename and insert, a moved registry (list/verify/load), a registry path blocked
by a file. Here: the same guarantees where a user meets them, in a stage's command line.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from conftest import run_script
from reliability.conftest import TINY_PPO, assert_clean_failure, copy_registry, listing, verify
from rlhf.registry import Registry

pytestmark = pytest.mark.slow


def _sft_args(registry: Path, tiny_data: dict[str, Path], model: str) -> list[str]:
    return ["stages/01_sft.py", "--registry", str(registry), "--model", model, "--data", str(tiny_data["sft"]),
            "--eval_data", str(tiny_data["sft_eval"]), "--max_steps", "1", "--gen_eval_samples", "0"]


def _ppo_args(registry: Path, tiny_data: dict[str, Path], reward: str) -> list[str]:
    return ["stages/03_ppo.py", "--registry", str(registry), "--data", str(tiny_data["prompts"]), *TINY_PPO,
            "--total_episodes", "8", "--reward_model", reward]


@pytest.mark.parametrize(("stage", "entry_stage", "file", "damage"), [
    ("01", "pretrain", "model.safetensors", "modified"),
    ("01", "pretrain", "tokenizer.json", "missing"),
    ("03", "reward", "score_head.safetensors", "modified"),
], ids=["01-pretrain-modified", "01-pretrain-missing", "03-reward-modified"])
def test_stage_refuses_a_reference_whose_artifact_was_tampered_with(stage, entry_stage, file, damage, rlhf_registry,
                                                                    tiny_data, tmp_path):
    """Loading `stage:<id>` re-checks the manifest: the stage stops with one line naming entry and file."""
    reg = copy_registry(rlhf_registry, tmp_path / "runs")
    entry = Registry(reg).get(f"{entry_stage}:latest")
    target = entry.path / file
    if damage == "modified":
        with target.open("ab") as f:
            f.write(b"\0")
    else:
        target.unlink()
    before = listing(reg)
    ref = f"{entry_stage}:{entry.id}"
    argv = _sft_args(reg, tiny_data, ref) if stage == "01" else _ppo_args(reg, tiny_data, ref)
    stderr = assert_clean_failure(run_script(*argv))
    assert f"{entry.ref}: artifacts fail verification" in stderr and f"{file}: {damage}" in stderr, stderr[-2000:]
    assert listing(reg) == before
    checked = verify(reg)
    assert checked.returncode == 1 and f"{entry.ref}: {file}: {damage}" in checked.stdout


def test_unwritable_registry_folder_is_reported_before_training(tiny_data, tmp_path):
    """A registry path that cannot be a folder (a file in the way: what a read-only or full disk looks like
    to a root user, for whom permission bits do not stop writes) stops the stage before it trains."""
    (tmp_path / "blocked").write_text("a file, not a folder")
    reg = tmp_path / "blocked" / "runs"
    stderr = assert_clean_failure(run_script(*_sft_args(reg, tiny_data, "pretrain:latest")))
    assert f"cannot create registry folder {reg}" in stderr, stderr[-2000:]
    assert "[sft]" not in stderr, "the stage got as far as training"


# Runs a stage as `python SCRIPT ARGS...` would, on a disk that reports 10 MiB free.
_DISK_NEARLY_FULL = """
import runpy, shutil, sys
real_disk_usage = shutil.disk_usage
shutil.disk_usage = lambda path: real_disk_usage(path)._replace(free=10 * 2**20)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_disk_nearly_full_is_reported_before_training(pretrained_registry, tiny_data, tmp_path):
    reg = copy_registry(pretrained_registry, tmp_path / "runs")
    before = listing(reg)
    res = run_script("-c", _DISK_NEARLY_FULL, *_sft_args(reg, tiny_data, "pretrain:latest"))
    stderr = assert_clean_failure(res)
    assert f"only 10 MiB free under {reg}" in stderr and "256 MiB" in stderr, stderr[-2000:]
    assert "[sft]" not in stderr, "the stage got as far as training"
    assert listing(reg) == before and not any((reg / ".work").glob("*"))


def test_registry_copied_elsewhere_mid_run_resumes_and_registers_there(reward_killed_and_resumed):
    """The reward run of conftest.py is killed on "machine A", its registry `cp -r`'d to "machine B" and A's
    deleted; --resume on B continues the run (test_faults.py) and the result lives wholly in B."""
    run = reward_killed_and_resumed
    assert not (run.registry.parent.parent / "machine_a" / "runs").exists(), "the original was not deleted"
    assert run.second.returncode == 0, run.second.stderr[-3000:]
    rows = listing(run.registry)
    assert {r["stage"] for r in rows} == {"pretrain", "reward"}
    reward = next(r for r in rows if r["stage"] == "reward")
    pretrain = next(r for r in rows if r["stage"] == "pretrain")
    assert reward["parents"] == [f"pretrain:{pretrain['id']}"]
    assert all(Path(r["path"]).is_relative_to(run.registry) for r in rows)
    with sqlite3.connect(run.registry / "registry.db") as conn:
        stored = [p for (p,) in conn.execute("SELECT path FROM entries")]
    assert stored and not any(Path(p).is_absolute() for p in stored), stored
    Registry(run.registry).get(f"reward:{reward['id']}")  # loads, manifest verified
    checked = verify(run.registry)
    assert checked.returncode == 0, checked.stdout + checked.stderr
