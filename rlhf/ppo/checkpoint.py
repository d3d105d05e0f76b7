"""What lets a PPO run survive a crash, a kill or Ctrl-C: numbered, atomic checkpoints and the metrics log.

    checkpoint-<step>/
        trainable.safetensors   policy and value adapters, value head (ActorCritic.trainable_state_dict)
        state.pt                optimizer and scheduler
        rng-<rank>.pt           each process's torch / CUDA / numpy / Python RNG state
        trainer_state.json      step, world size, KL / toxicity controllers; written last

Every process calls `save_checkpoint` at the same step: each writes its own RNG state into a
temporary folder, then process 0 writes the rest and renames the folder into place. A folder
without `trainer_state.json` was cut off mid-save and is never resumed from
(`rlhf.stage.StageRun.last_checkpoint`). `--resume` then continues exactly where the checkpoint
left off, with the same number of processes.

Besides, process 0 keeps the policy adapter of every checkpointed step as `snapshots/step-<step>/policy/`
(`save_policy_snapshot`); the entry keeps at most `max_policy_snapshots` of them, evenly spread over the
run (`thin_snapshots`), for stage 04's reward–KL frontier.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.ppo.distributed import barrier

TRAINER_STATE = "trainer_state.json"


def save_checkpoint(work_dir: Path, ac: Any, optimizer: Any, scheduler: Any, controllers: dict[str, Any], step: int,
                    *, rank: int = 0, world_size: int = 1, keep: int = 2) -> Path:
    """Write `checkpoint-<step>/` (see the module docstring), keeping the newest `keep`; called by every process."""
    import torch
    from safetensors.torch import save_file

    folder = work_dir / f"checkpoint-{step}"
    tmp = work_dir / f"tmp-checkpoint-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world_size)
    torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
    barrier(world_size)
    if rank == 0:
        save_file(ac.trainable_state_dict(), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
        (tmp / TRAINER_STATE).write_text(json.dumps({
            "step": step, "world_size": world_size,
            "controllers": {k: c.state_dict() for k, c in controllers.items()}}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        older = sorted((p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]))[:-keep]
        for p in older:
            shutil.rmtree(p, ignore_errors=True)
    barrier(world_size)
    return folder


def load_checkpoint(folder: Path, ac: Any, optimizer: Any, scheduler: Any, controllers: dict[str, Any],
                    *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into the given objects; return trainer_state.json's content."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((folder / TRAINER_STATE).read_text())
    saved_world = meta.get("world_size", 1)
    if saved_world != world_size:
        raise UserError(f"{folder}: written by {saved_world} process(es), resumed with {world_size}; "
                        f"resume with the same number of processes (or start afresh without --resume)")
    ac.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(torch.load(folder / f"rng-{rank}.pt", weights_only=True))
    for k, c in controllers.items():
        c.load_state_dict(meta["controllers"][k])
    return meta


def save_policy_snapshot(work_dir: Path, ac: Any, step: int) -> Path:
    """The policy adapter at `step` as `snapshots/step-<step>/policy/` (written to a temporary name, then renamed)."""
    folder = work_dir / "snapshots" / f"step-{step}"
    tmp = work_dir / "snapshots" / f"tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    ac.model.save_pretrained(str(tmp), selected_adapters=["policy"])
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def thin_snapshots(folder: Path, keep: int) -> list[Path]:
    """The snapshots `snapshots/step-<n>/` of `folder` to keep: all when there are at most `keep`, else `keep` of them
    evenly spread from the first to the last (0: none). Steps after `last_step` (left by a crash) are not listed."""
    snaps = sorted((p for p in (folder / "snapshots").glob("step-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    if keep <= 0 or not snaps:
        return []
    if len(snaps) <= keep:
        return snaps
    picks = sorted({round(i * (len(snaps) - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [len(snaps) - 1]
    return [snaps[i] for i in picks]


def policy_snapshots(entry_dir: Path, keep: int) -> list[tuple[int, Path]]:
    """(step, policy adapter folder) of the snapshots `thin_snapshots` keeps in a folder (a ppo entry or a run's work
    folder), oldest first."""
    return [(int(snap.name.rsplit("-", 1)[1]), snap / "policy") for snap in thin_snapshots(Path(entry_dir), keep)]


def resume_metrics_log(path: Path, steps: int, rank: int) -> list[dict[str, Any]]:
    """The per-step metrics of the first `steps` steps, with the log cut to exactly those lines (a crash may
    have left lines of steps after the checkpoint). Process 0 owns the file; other processes return []."""
    if rank != 0 or not path.exists():
        return []
    history = [json.loads(line) for line in path.read_text().splitlines()[:steps]]
    path.write_text("".join(json.dumps(m) + "\n" for m in history))
    return history


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python_rng": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
