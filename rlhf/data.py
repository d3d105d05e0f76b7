"""Loading a stage's data: every record of a source, validated before any training.

Stages call `load_records(source, schema)`; `scripts/validate_data.py` calls
`check_file`. A source is a local `.jsonl` / `.json` / `.parquet` file or a hub
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
from typing import Iterator, NamedTuple

from rlhf.data_formats import ADAPTERS, SCHEMAS, Adapter, Record, plural, validate_record
from rlhf.data_sources import Item, is_local, iter_file, iter_hub
from rlhf.errors import DataError
from rlhf.registry import sha256_file

DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024


class FileReport(NamedTuple):
    """What validating one source found: records read, problem lines (bounded), problems in all."""

    records: int
    problems: list[str]
    total_problems: int


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

    def report(location: str, message: str) -> None:
        nonlocal total
        total += 1
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
    return FileReport(records, problems, total)


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
    if report.problems:
        summary = f"{plural(report.total_problems, 'problem')} in {label} ({schema} schema)"
        raise DataError("\n".join([summary, *report.problems]), report.problems)
    return records


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
