"""What every stage script does before and after its own work: open the registry,
pick the run's work folder (for --resume), reuse an identical entry when asked,
and register the result.

A run's *key* hashes the config fields that change the result together with its
inputs (data fingerprints, parent entries): the same key means the same run.
`--resume` continues from the work folder of the same key; `--reuse` (what
`scripts/run_pipeline.py` passes unless `--force`) returns an entry registered
under the same key instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf import console
from rlhf.config import public_config
from rlhf.errors import DataError, UserError
from rlhf.registry import Entry, Registry

MIN_FREE_MB = 256


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """A start-up or progress line on stderr: process 0's only; with --verbose every process's, prefixed by its
    rank in a run of several (rlhf.console)."""
    if is_main_process() or console.verbose():
        print(console.with_rank(msg), file=sys.stderr, flush=True)


@dataclass
class StageRun:
    stage: str
    registry: Registry
    key: str
    work_dir: Path
    reused: Entry | None = None

    def last_checkpoint(self) -> str | None:
        """The newest `checkpoint-N` folder in the work folder, or None."""
        # trainer_state.json is written last: a checkpoint without it was cut off mid-save.
        ckpts = [p for p in self.work_dir.glob("checkpoint-*")
                 if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
        if not ckpts:
            return None
        return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1])))


def begin(stage: str, cfg: Any, inputs: dict[str, str]) -> StageRun:
    """Open the registry and prepare the work folder; see the module docstring."""
    import transformers

    transformers.set_seed(cfg.seed)
    registry = Registry(cfg.registry)
    free_mb = shutil.disk_usage(registry.root).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise UserError(f"only {free_mb:.0f} MiB free under {registry.root}; a stage needs at least {MIN_FREE_MB} MiB")
    if is_main_process():
        registry.cleanup()
    payload = json.dumps({"config": cfg.fingerprint(), "inputs": inputs}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    run = StageRun(stage=stage, registry=registry, key=key, work_dir=registry.root / ".work" / f"{stage}-{key}")
    if getattr(cfg, "reuse", False) and not cfg.resume:
        run.reused = registry.find(stage, key)
        if run.reused is not None:
            log(f"[{stage}] reusing {run.reused.ref}: same config and inputs (pass --force to the pipeline to redo)")
            return run
    if is_main_process():
        if not cfg.resume and run.work_dir.exists():
            shutil.rmtree(run.work_dir)
        run.work_dir.mkdir(parents=True, exist_ok=True)
    # Trainer-based stages write TensorBoard events here; `finish` copies them into the entry.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.work_dir / "tensorboard")
    if cfg.resume:
        ckpt = run.last_checkpoint()
        log(f"[{stage}] resuming from {ckpt}" if ckpt else f"[{stage}] --resume: no checkpoint yet, starting fresh")
    return run


def read_data(stage: str, source: str, schema: str, *, split: str = "train", adapter: str | None = None,
              on_invalid: str = "error") -> tuple[list[dict[str, Any]], int]:
    """(valid records, how many invalid ones were skipped) of a stage's data source (`rlhf.data.read_records`);
    with `on_invalid: skip` the count and the first reasons go to the log."""
    from rlhf.data import read_records

    loaded = read_records(source, schema, split=split, adapter=adapter, on_invalid=on_invalid)
    if loaded.skipped:
        first = "; ".join(loaded.problems[:3])
        log(f"[{stage}] {source}: skipped {loaded.skipped} invalid record(s) of {loaded.skipped + len(loaded.records)} "
            f"(on_invalid: skip); first: {first}")
    return loaded.records, loaded.skipped


@dataclass
class TrainEval:
    """A Trainer stage's training and held-out records, what identifies them, and what its entry records."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprints: dict[str, str]  # of the sources: part of the run's key and the entry's data fingerprints
    recorded: dict[str, Any]  # for the entry's config: `heldout_split` (None with eval_data) and `data_skipped`


def train_eval_data(stage: str, cfg: Any, schema: str, adapter: str | None = None) -> TrainEval:
    """`cfg.data`, and `cfg.eval_data` or, without it, a seeded `cfg.eval_fraction` of `cfg.data` held out
    (`rlhf.data.holdout_split`; said in the log and recorded in the entry). Reads the fields `data`, `data_split`,
    `eval_data`, `eval_split`, `eval_fraction`, `seed` and `on_invalid` of `cfg`."""
    from rlhf.data import fingerprint, holdout_split

    train, skipped = read_data(stage, cfg.data, schema, split=cfg.data_split, adapter=adapter, on_invalid=cfg.on_invalid)
    fingerprints = {"data": fingerprint(cfg.data, cfg.data_split)}
    recorded: dict[str, Any] = {"data_skipped": {"data": skipped}}
    if cfg.eval_data:
        held_out, recorded["data_skipped"]["eval_data"] = read_data(
            stage, cfg.eval_data, schema, split=cfg.eval_split, adapter=adapter, on_invalid=cfg.on_invalid)
        fingerprints["eval_data"] = fingerprint(cfg.eval_data, cfg.eval_split)
        return TrainEval(train, held_out, fingerprints, {**recorded, "heldout_split": None})
    n = len(train)
    train, held_out, info = holdout_split(train, cfg.eval_fraction, cfg.seed)
    log(f"[{stage}] no eval_data: {info['eval_rows']} of the {n} records of {cfg.data} held out for evaluation "
        f"(eval_fraction {cfg.eval_fraction}, seed {cfg.seed}; recorded in the entry)")
    return TrainEval(train, held_out, fingerprints, {**recorded, "heldout_split": {"source": "data", **info}})


def exclude_labelled_data(stage: str, data: TrainEval, field: str, labels: list[str]) -> TrainEval:
    """`data` without the records whose `field` is one of `labels` (`rlhf.data.exclude_labelled`), in training and
    held-out alike: the counts go to the log and to `recorded["data_excluded"]`, a label no record has is said so
    (a typo keeps everything). Refuses (DataError) when no training or no held-out record is left."""
    from rlhf.data import exclude_labelled

    train, train_dropped = exclude_labelled(data.train, field, labels)
    held_out, eval_dropped = exclude_labelled(data.eval, field, labels)
    counts = {label: train_dropped[label] + eval_dropped[label] for label in labels}
    log(f"[{stage}] exclude_labels: dropped {sum(train_dropped.values())} training and {sum(eval_dropped.values())} "
        f"held-out record(s) whose {field!r} is " + ", ".join(f"{k!r} ({n})" for k, n in counts.items()))
    unmatched = [label for label, n in counts.items() if n == 0]
    if unmatched:
        seen = sorted({r[field] for r in data.train + data.eval if isinstance(r.get(field), str)})
        log(f"[{stage}] exclude_labels: no record has {field!r} = {', '.join(map(repr, unmatched))}; the values "
            f"present are {', '.join(map(repr, seen)) if seen else 'none (no record has the field)'}")
    for name, rows, before in (("training", train, data.train), ("held-out", held_out, data.eval)):
        if not rows:
            raise DataError(f"exclude_labels {labels} on {field!r} left no {name} record (all {len(before)} dropped)")
    recorded = {**data.recorded, "data_excluded": {"field": field, "data": train_dropped, "eval_data": eval_dropped}}
    return TrainEval(train, held_out, data.fingerprints, recorded)


def trainer_kwargs(cfg: Any, run: StageRun) -> dict[str, Any]:
    """The keyword arguments that stages 00, 01 and 02 give their transformers/TRL Trainer config alike: batch
    sizes, a cosine schedule, logging and checkpoints in the run's work folder (TensorBoard events included),
    seeds, and the device's precision (`rlhf.models.trainer_precision_args`). `cfg` has the fields of
    `rlhf.config.TrainerStageConfig` that these name; each stage adds its own."""
    from rlhf.models import trainer_precision_args

    return dict(
        output_dir=str(run.work_dir), per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=2, report_to=["tensorboard"], seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
        **trainer_precision_args(),
    )


def trainer_metrics(train_out: Any, eval_loss: float, prefix: str = "") -> dict[str, float]:
    """What a Trainer stage reports of its training: final train loss, held-out loss and perplexity, steps
    (`prefix` names another evaluation's keys, e.g. "base_" for the starting model's held-out loss)."""
    from rlhf.eval.metrics import perplexity

    out = {f"{prefix}eval_loss": eval_loss, f"{prefix}eval_perplexity": perplexity(eval_loss, 1)}
    if train_out is not None:
        out.update(train_loss=train_out.training_loss, steps=train_out.global_step)
    return out


def finish(
    run: StageRun,
    staged: Path,
    cfg: Any,
    *,
    parents: list[str],
    metrics: dict[str, Any],
    data_fingerprints: dict[str, str],
    extra_config: dict[str, Any] | None = None,
) -> Entry:
    """Register the staged folder and drop the run's work folder."""
    tb = run.work_dir / "tensorboard"
    if tb.is_dir():
        shutil.copytree(tb, staged / "tensorboard", dirs_exist_ok=True)
    (staged / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    config = {**public_config(cfg), **(extra_config or {}), "_fingerprint": run.key}
    entry = run.registry.register(
        run.stage, staged, parents=parents, config=config, metrics=metrics, data_fingerprints=data_fingerprints
    )
    shutil.rmtree(run.work_dir, ignore_errors=True)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
    log(f"[{run.stage}] registered {entry.ref} at {entry.path}\n[{run.stage}] {shown}")
    return entry
