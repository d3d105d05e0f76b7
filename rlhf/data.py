"""Loading a stage's data: every record of a source, validated before any training.

Stages call `load_records(source, schema)`, or `read_records(..., on_invalid="skip")` to drop invalid
records and count them instead of refusing the source; `holdout_split` holds a seeded share out for
evaluation; `exclude_labelled` drops the records a label field marks (e.g. `"kind": "rude"`);
`scripts/validate_data.py` calls `check_file`. A source is a local `.jsonl` / `.json` / `.parquet` file or a hub
dataset id (`rlhf.data_sources` reads them); each record goes through a named
adapter first when one is given, then through the checks of its format
(`rlhf.data_formats`, documented in `data_schemas/README.md`). `load_records`
refuses to return anything unless every record passes. A problem reads
`FILE:LOCATION: field: got X, expected Y`, e.g.

    train.jsonl:3: messages[2].role: got 'bot', expected one of system, user, assistant

`fingerprint` names what a source holds, for the registry's data fingerprints.

Import cost: the standard library only; jsonschema, pyarrow and datasets are
imported inside the functions that need them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from rlhf.data_formats import ADAPTERS, SCHEMAS, Adapter, Record, plural, validate_record
from rlhf.data_sources import Item, is_local, iter_file, iter_hub
from rlhf.errors import DataError
from rlhf.registry import sha256_file

DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024


class FileReport(NamedTuple):
    """What validating one source found: records read, problem lines (bounded), problems in all, and how many
    records (or unreadable lines) had at least one problem."""

    records: int
    problems: list[str]
    total_problems: int
    bad_records: int = 0


ON_INVALID = ("error", "skip")


class Loaded(NamedTuple):
    """A source's valid records, and what `on_invalid: skip` dropped: how many, and the first reasons."""

    records: list[Record]
    skipped: int
    problems: list[str]


def _check(
    items: Iterator[Item],
    schema: str,
    adapter: str | None,
    max_problems: int,
    keep: list[Record] | None = None,
) -> FileReport:
    """Validate every item (after the adapter); keep the first `max_problems` problems, count the rest."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}, expected one of {', '.join(SCHEMAS)}")
    convert = _adapter(adapter)
    records, total, problems = 0, 0, []
    bad: set[str] = set()  # locations (FILE:LINE, hub rows) of records with at least one problem

    def report(location: str, message: str) -> None:
        nonlocal total
        total += 1
        bad.add(location)
        if len(problems) < max_problems:
            problems.append(f"{location}: {message}")

    for item in items:
        if item.problem is not None:
            report(item.location, item.problem)
            continue
        records += 1
        record = item.record
        if convert is not None:
            try:
                record = convert(record)
            except ValueError as exc:
                report(item.location, str(exc))
                continue
            except Exception as exc:  # an adapter bug must not hide which record triggered it
                report(item.location, f"adapter {adapter!r} failed ({type(exc).__name__}: {exc})")
                continue
        messages = validate_record(record, schema)
        for message in messages:
            report(item.location, message)
        if keep is not None and not messages:
            keep.append(record)
    if total > len(problems):
        problems.append(f"... and {plural(total - len(problems), 'more problem')}")
    return FileReport(records, problems, total, len(bad))


def _adapter(name: str | None) -> Adapter | None:
    if name is None:
        return None
    if name not in ADAPTERS:
        raise DataError(f"unknown adapter {name!r}, expected one of {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


def check_file(
    path: str | Path,
    schema: str,
    *,
    adapter: str | None = None,
    max_problems: int = 20,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> FileReport:
    """Validate a local .jsonl/.json/.parquet file; how many records it holds and what is wrong."""
    return _check(iter_file(path, schema, adapter is None, max_line_bytes), schema, adapter, max_problems)


def validate_file(
    path: str | Path,
    schema: str,
    max_problems: int = 20,
    *,
    adapter: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> list[str]:
    """Problems in a local file, one `FILE:LINE: field: got X, expected Y` line each; [] when valid.

    At most `max_problems` lines, then one `... and N more problems` line.
    """
    return check_file(path, schema, adapter=adapter, max_problems=max_problems, max_line_bytes=max_line_bytes).problems


def load_records(
    source: str | os.PathLike[str],
    schema: str,
    *,
    split: str = "train",
    adapter: str | None = None,
    max_problems: int = 20,
) -> list[Record]:
    """Every record of a local file or hub dataset (after `adapter`), all validated against `schema`.

    Raises DataError when the source is missing or unreachable, or when any record
    is invalid; its message is `N problems in SOURCE` followed by the problem lines.
    """
    return read_records(source, schema, split=split, adapter=adapter, max_problems=max_problems).records


def read_records(
    source: str | os.PathLike[str],
    schema: str,
    *,
    split: str = "train",
    adapter: str | None = None,
    max_problems: int = 20,
    on_invalid: str = "error",
) -> Loaded:
    """`load_records`, with a choice for invalid records: `on_invalid="error"` refuses the source (DataError naming
    every problem, up to `max_problems`), `"skip"` drops them and says how many and why (real hub datasets hold a
    few empty or identical pairs). A source with no valid record at all is refused either way."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    source = os.fspath(source)
    if is_local(source):
        if not Path(source).expanduser().exists():
            raise DataError(
                f"{source}: no such file, expected a local .jsonl, .json or .parquet file or a hub dataset id",
                [f"{source}: no such file"],
            )
        label, items = source, iter_file(source, schema, adapter is None, DEFAULT_MAX_LINE_BYTES)
    else:
        label, items = f"hub:{source}@{split}", iter_hub(source, split)
    records: list[Record] = []
    report = _check(items, schema, adapter, max_problems, keep=records)
    if report.problems and (on_invalid == "error" or not records):
        summary = f"{plural(report.total_problems, 'problem')} in {label} ({schema} schema)"
        if records == [] and on_invalid == "skip":
            summary += "; no valid record left to keep"
        raise DataError("\n".join([summary, *report.problems]), report.problems)
    return Loaded(records, report.bad_records, report.problems)


def holdout_split(records: list[Record], fraction: float, seed: int, *, min_rows: int = 8,
                  max_rows: int = 1000) -> tuple[list[Record], list[Record], dict[str, Any]]:
    """(train, held-out, what to record) from one list: a seeded random `fraction` of the records held out, at least
    `min_rows` and at most `max_rows` of them, and never more than half. The record holds the fraction, seed, row
    counts and a fingerprint of each part, so the split can be checked or rebuilt from the same data and seed.

    >>> train, held, info = holdout_split([{"text": str(i)} for i in range(40)], 0.05, seed=0)
    >>> len(train), len(held), info["eval_rows"]
    (32, 8, 8)
    """
    import random

    n = len(records)
    if n < 2:
        raise DataError(f"{n} record(s): too few to hold some out for evaluation; pass eval_data")
    n_eval = min(max(round(fraction * n), min_rows), max_rows, n // 2)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_eval])
    held_set = set(held)
    train = [r for i, r in enumerate(records) if i not in held_set]
    eval_records = [records[i] for i in held]
    info = {"fraction": fraction, "seed": seed, "train_rows": len(train), "eval_rows": len(eval_records),
            "train_fingerprint": records_fingerprint(train), "eval_fingerprint": records_fingerprint(eval_records)}
    return train, eval_records, info


def exclude_labelled(records: list[Record], field: str, labels: Sequence[str]) -> tuple[list[Record], dict[str, int]]:
    """(the records whose `field` is not one of `labels`, how many were dropped per label, 0 for a label no record
    has). A record without the field is kept: a label says what to drop, its absence says nothing.

    >>> kept, dropped = exclude_labelled([{"kind": "rude"}, {"kind": "real"}, {"text": "x"}], "kind", ["rude", "spam"])
    >>> len(kept), dropped
    (2, {'rude': 1, 'spam': 0})
    """
    wanted = set(labels)
    dropped = dict.fromkeys(labels, 0)
    kept = []
    for r in records:
        label = r.get(field)
        if isinstance(label, str) and label in wanted:
            dropped[label] += 1
        else:
            kept.append(r)
    return kept, dropped


def records_fingerprint(records: list[Record]) -> str:
    """sha256 (hex) of records as canonical JSON, one per line: equal for the same records in the same order."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def fingerprint(source: str | os.PathLike[str], split: str = "train") -> str:
    """sha256 (hex) of a local file's bytes, streamed; `hub:<id>@<split>` for a hub dataset."""
    source = os.fspath(source)
    if not is_local(source):
        return f"hub:{source}@{split}"
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{source}: no such file, cannot fingerprint it", [f"{source}: no such file"])
    return sha256_file(path)


__all__ = ["DEFAULT_MAX_LINE_BYTES", "FileReport", "check_file", "fingerprint", "load_records", "validate_file"]
