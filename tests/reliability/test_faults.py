"""Crashes mid-training, then `--resume` (issue 8).

Stages 01 and 02 SIGKILL themselves right after their first complete Trainer checkpoint (the wrapper of
test_stage00.py: no timing race); PPO gets SIGINT once its first step is logged. The runs themselves are the
session fixtures of conftest.py, which test_security.py also inspects.

Covered next to the other tests of their stage, not repeated here:
- 00: tests/test_stage00.py::test_killed_run_resumes_from_its_checkpoint (SIGKILL, resume, same eval_loss);
- 03: tests/test_ppo_stage.py::test_killed_run_resumes_and_matches_an_uninterrupted_run (SIGKILL, resume,
  the same metrics step by step as an uninterrupted run);
- 02 after a KeyboardInterrupt (not a kill): tests/test_reward_stage.py.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from reliability.conftest import Interrupted, leftovers, listing, verify
from rlhf.registry import STAGES, build_manifest

pytestmark = pytest.mark.slow


def _new_rows(run: Interrupted) -> list[dict]:
    known = {r["id"] for r in run.rows_before}
    return [r for r in listing(run.registry) if r["id"] not in known]


def _assert_every_row_points_at_a_complete_folder(registry: Path) -> None:
    """Each row's folder holds exactly the files of its manifest, and no folder lies there without a row."""
    rows = listing(registry)
    for row in rows:
        folder = Path(row["path"])
        assert folder.is_dir() and build_manifest(folder) == row["manifest"], f"{row['stage']}:{row['id']}"
    on_disk = {p for stage in STAGES for p in (registry / stage).glob("*")}
    assert on_disk == {Path(r["path"]) for r in rows}, "folders without a row"
    checked = verify(registry)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(("fixture", "stage"),
                         [("sft_killed_and_resumed", "sft"), ("reward_killed_and_resumed", "reward")])
def test_killed_stage_resumes_from_its_checkpoint_and_registers_once(fixture, stage, request):
    run: Interrupted = request.getfixturevalue(fixture)
    assert run.first.returncode == -signal.SIGKILL, run.first.stderr[-3000:]
    assert run.checkpoints == ["checkpoint-2"], "the kill came right after the first checkpoint (of 2 steps)"
    assert run.rows_after_first == run.rows_before, "a killed run registered something"

    assert run.second.returncode == 0, run.second.stderr[-3000:]
    assert "resuming from" in run.second.stderr and "checkpoint-2" in run.second.stderr
    (new,) = _new_rows(run)
    assert new["stage"] == stage and new["metrics"]["steps"] == 4
    _assert_every_row_points_at_a_complete_folder(run.registry)
    assert leftovers(run.registry) == []


def _interrupted_step(run: Interrupted) -> int:
    found = re.search(r"interrupted: checkpoint at step (\d+) saved", run.first.stderr)
    assert found, f"no 'interrupted: checkpoint at step N saved' message:\n{run.first.stderr[-3000:]}"
    return int(found.group(1))


def test_sigint_during_ppo_saves_a_checkpoint_and_resume_continues_from_it(ppo_interrupted_and_resumed):
    run = ppo_interrupted_and_resumed
    assert run.first.returncode in (0, 130), run.first.stderr[-3000:]
    assert "Traceback" not in run.first.stderr, run.first.stderr[-3000:]
    step = _interrupted_step(run)
    assert 1 <= step < 3 and "--resume" in run.first.stderr
    assert run.checkpoints == [f"checkpoint-{step}"]
    assert run.rows_after_first == run.rows_before, "an interrupted run registered something"

    assert run.second.returncode == 0, run.second.stderr[-3000:]
    assert f"resumed at step {step}" in run.second.stderr
    (new,) = _new_rows(run)
    assert new["stage"] == "ppo" and new["metrics"]["steps"] == 3
    logged = [json.loads(line) for line in (Path(new["path"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3], "metrics.jsonl holds every step once"
    _assert_every_row_points_at_a_complete_folder(run.registry)
    assert leftovers(run.registry) == []


def test_resumed_ppo_summarizes_the_whole_run_not_only_the_steps_after_resume(ppo_interrupted_and_resumed):
    """The registered summary (`score_first_quarter`, ...) must be the same whether or not the run was
    interrupted: computed over all steps in metrics.jsonl, not over the steps of the last process."""
    run = ppo_interrupted_and_resumed
    assert run.second.returncode == 0, run.second.stderr[-3000:]
    (new,) = _new_rows(run)
    logged = [json.loads(line) for line in (Path(new["path"]) / "metrics.jsonl").read_text().splitlines()]
    quarter = max(1, len(logged) // 4)
    first, last = logged[:quarter], logged[-quarter:]
    for key, rows in (("score_first_quarter", first), ("toxicity_first_quarter", first),
                      ("score_last_quarter", last), ("toxicity_last_quarter", last)):
        metric = key.split("_")[0]
        want = sum(r[f"objective/{metric}"] for r in rows) / len(rows)
        assert new["metrics"][key] == pytest.approx(want), key


def test_resumed_ppo_does_not_announce_a_fresh_start(ppo_interrupted_and_resumed):
    """A resume that continues from step N must not also log `--resume: no checkpoint yet, starting fresh`:
    a user reading it would think the progress was lost and kill the run."""
    run = ppo_interrupted_and_resumed
    assert "resumed at step" in run.second.stderr, run.second.stderr[-3000:]
    assert "starting fresh" not in run.second.stderr, [l for l in run.second.stderr.splitlines() if "[ppo]" in l]
