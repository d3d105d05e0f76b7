"""Stage 03 as two processes (gloo on the CPU): Ctrl-C reaching one rank stops both after the same step, with one
complete checkpoint, and --resume then finishes the run exactly as if it had never stopped.

The ranks are launched the way torchrun launches them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in each one's environment; `Accelerator()` joins the process group from those), but as two plain
processes, so the test sees each rank's own exit code and stderr (torchrun would report one code, and it tears the
other workers down when the first one exits non-zero).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from rlhf.registry import Registry

pytestmark = pytest.mark.slow

WORLD = 2
# 24 steps of 8 episodes (2 per micro-batch x 2 minibatches x 2 processes), 0.1-0.3 s each: the run is
# interrupted once step 1 is logged, and the 23 steps left are the margin for the signal to land before it ends.
# save_steps beyond the run: the interrupt's checkpoint is the only one.
ARGS = ["--total_episodes", "192", "--per_device_train_batch_size", "2", "--num_mini_batches", "2",
        "--num_ppo_epochs", "1", "--response_length", "8", "--max_prompt_length", "32", "--toxicity", "profanity-check",
        "--learning_rate", "5e-3", "--lora_r", "4", "--save_steps", "1000"]
STEPS = 24
DEADLINE_S = 300
# Wall-clock numbers: they differ between any two runs.
UNTIMED = ("timing/", "episodes_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Rank:
    proc: subprocess.Popen
    err_path: Path

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")


def _launch(registry: Path, prompts: Path, logs: Path, *extra: str) -> list[Rank]:
    """The two ranks of `stages/03_ppo.py`, as torchrun would start them (one thread each: 2 ranks on 2 cores)."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        err = logs / f"rank{rank}.err"
        with (logs / f"rank{rank}.out").open("w") as out_f, err.open("w") as err_f:
            proc = subprocess.Popen([sys.executable, "stages/03_ppo.py", "--registry", str(registry),
                                     "--data", str(prompts), *ARGS, *extra],
                                    cwd=ROOT, env=env, stdout=out_f, stderr=err_f)
        ranks.append(Rank(proc, err))
    return ranks


def _wait(ranks: list[Rank], deadline: float) -> list[int]:
    """Every rank's exit code; the ranks still running at the deadline are killed and the test fails."""
    try:
        for r in ranks:
            r.proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail("a rank was still running at the deadline:\n" + "\n".join(r.stderr[-1500:] for r in ranks))
    finally:
        for r in ranks:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
    return [r.proc.returncode for r in ranks]


def _run_to_completion(registry: Path, prompts: Path, logs: Path, *extra: str) -> list[Rank]:
    ranks = _launch(registry, prompts, logs, *extra)
    codes = _wait(ranks, time.time() + DEADLINE_S)
    assert codes == [0] * WORLD, "\n".join(f"rank {i} exited {c}:\n{r.stderr[-3000:]}"
                                           for i, (r, c) in enumerate(zip(ranks, codes)))
    return ranks


def _logged_steps(registry: Path) -> int:
    """Lines of the run's metrics.jsonl in its work folder (rank 0 appends one per finished step)."""
    logs = list(registry.glob(".work/ppo-*/metrics.jsonl"))
    return logs[0].read_text().count("\n") if logs else 0


def _entry_tensors(entry_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(entry_path / name)) for name in
            ("policy/adapter_model.safetensors", "value/adapter_model.safetensors", "value_head.safetensors")}


def _metrics(entry_path: Path) -> list[dict]:
    return [json.loads(line) for line in (entry_path / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_and_resume_matches_an_uninterrupted_run(
        rlhf_registry, tiny_data, tmp_path):
    """SIGINT delivered to rank 1 only (the rank that neither logs nor writes the shared checkpoint files): both
    ranks finish the same step, save one complete checkpoint (rank 0's tensors and state, each rank's RNG), exit
    with 130 and no traceback, and register nothing. `--resume` with two processes then registers one entry whose
    adapters, value head and per-step metrics are those of an uninterrupted two-process run with the same args."""
    prompts = tiny_data["prompts"]

    # The uninterrupted run.
    ref_reg = tmp_path / "uninterrupted" / "runs"
    shutil.copytree(rlhf_registry, ref_reg)
    _run_to_completion(ref_reg, prompts, tmp_path / "logs-uninterrupted")
    (reference,) = Registry(ref_reg).entries("ppo")

    # The interrupted run: SIGINT to rank 1 once step 1 is logged.
    reg = tmp_path / "interrupted" / "runs"
    shutil.copytree(rlhf_registry, reg)
    ranks = _launch(reg, prompts, tmp_path / "logs-interrupted")
    deadline = time.time() + DEADLINE_S
    try:
        while time.time() < deadline and all(r.proc.poll() is None for r in ranks) and _logged_steps(reg) < 1:
            time.sleep(0.02)
        assert all(r.proc.poll() is None for r in ranks), (
            "a rank ended before step 1 was logged:\n" + "\n".join(r.stderr[-2000:] for r in ranks))
        assert _logged_steps(reg) >= 1, "no step logged before the deadline"
        ranks[1].proc.send_signal(signal.SIGINT)
    finally:
        codes = _wait(ranks, deadline)
    errs = [r.stderr for r in ranks]
    assert codes == [130, 130], "\n".join(f"rank {i} exited {c}:\n{e[-3000:]}" for i, (c, e) in
                                          enumerate(zip(codes, errs)))
    for i, e in enumerate(errs):
        assert "Traceback" not in e, f"rank {i}:\n{e[-3000:]}"
    assert Registry(reg).entries("ppo") == [], "an interrupted run registered an entry"

    (work,) = reg.glob(".work/ppo-*")
    checkpoints = sorted(p.name for p in work.iterdir() if "checkpoint" in p.name)
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints  # no tmp-checkpoint-*
    ckpt = work / checkpoints[0]
    step = int(ckpt.name.split("-")[1])
    assert 1 <= step < STEPS, f"interrupted at step {step} of {STEPS}: the signal landed after the run ended"
    assert {"trainer_state.json", "trainable.safetensors", "state.pt", "rng-0.pt", "rng-1.pt"} <= {
        p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == WORLD
    assert _logged_steps(reg) == step, "metrics.jsonl must hold exactly the steps the checkpoint holds"
    assert f"interrupted: checkpoint at step {step} saved" in errs[0], errs[0][-3000:]

    # --resume with two processes finishes the run.
    ranks = _run_to_completion(reg, prompts, tmp_path / "logs-resumed", "--resume")
    assert f"resumed at step {step}" in ranks[0].stderr
    (resumed,) = Registry(reg).entries("ppo")

    # Same machine, same thread count, same two processes, and the checkpoint restores the exact fp32 tensors,
    # Adam moments, LR schedule, KL/toxicity controllers and every rank's RNG: the resumed run repeats the
    # uninterrupted run's arithmetic, so the results agree bit for bit (observed). The tolerance, 1e-6 absolute,
    # only leaves room for a harmless change in summation order; anything not restored (the RNG, one step of
    # the LR schedule, the optimizer moments) moves these tensors by ~1e-4 or more (Adam steps of lr 5e-3).
    got, want = _entry_tensors(resumed.path), _entry_tensors(reference.path)
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key in want[name]:
            torch.testing.assert_close(got[name][key], want[name][key], rtol=0, atol=1e-6,
                                       msg=lambda m, name=name, key=key: f"{name} {key}: {m}")

    got_rows, want_rows = _metrics(resumed.path), _metrics(reference.path)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == list(range(1, STEPS + 1))
    for g, w in zip(got_rows, want_rows):
        keys = [k for k in w if not k.startswith(UNTIMED)]
        assert {k: g[k] for k in keys} == pytest.approx({k: w[k] for k in keys}, rel=1e-6, abs=1e-9), w["step"]
    assert not list(reg.glob(".work/ppo-*")), "work folder left behind after registering"
