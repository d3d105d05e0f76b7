"""Reading records from a source, without judging them: local files and hub datasets.

Every reader yields `Item`s: a record with where it came from, or a problem met
reading it, which `rlhf.data` reports like an invalid record:

    .jsonl     FILE:LINE      line by line in binary; blank lines skipped; a line over
                              `max_line_bytes` is skipped unparsed, so memory stays bounded
    .json      FILE:record N  a JSON array (or JSON Lines when it starts with `{`)
    .parquet   FILE:row N     in batches; a missing required column is one problem, not one per row
    hub id     hub:ID@SPLIT:row N   `datasets.load_dataset`, failing in seconds when the hub is out of reach

Whole-file problems (no such file, an empty file, not a JSON array, wrong Parquet columns) carry `FILE` alone.

Import cost: the standard library only; pyarrow and datasets are imported inside the readers that need them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from rlhf.data_formats import describe
from rlhf.errors import DataError
from rlhf.hub import is_hub_id, unreachable

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Columns a Parquet file must have; a missing one is reported once, not once per row.
REQUIRED_COLUMNS = {
    "text": ("text",),
    "dialogue": ("messages",),
    "preference": ("chosen", "rejected"),
    "prompt": ("messages",),
}
HUB_PROBE_TIMEOUT_S = 3.0


class Item(NamedTuple):
    """One record read from a source, or a problem found reading it (then `record` is None)."""

    location: str  # FILE:LINE, FILE:record N, FILE:row N, or FILE for whole-file problems
    record: Any
    problem: str | None = None


def _empty(label: str, expected: str) -> Item:
    return Item(label, None, f"file is empty, expected {expected}")


def _iter_jsonl(path: Path, label: str, schema: str, max_line_bytes: int) -> Iterator[Item]:
    """Records of a JSON Lines file, read line by line in binary; blank lines are skipped.

    A line longer than `max_line_bytes` is skipped in 1 MiB chunks without parsing,
    so memory stays bounded by `max_line_bytes`.
    """
    seen = False
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            lineno += 1
            where = f"{label}:{lineno}"
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                seen = True
                size = len(raw) + _skip_rest_of_line(f)
                yield Item(where, None, f"line is {size} bytes, expected at most {max_line_bytes} bytes per line")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as some editors write
            if not raw.strip():
                continue
            seen = True
            yield _parse_line(raw.rstrip(b"\r\n"), where)
    if not seen:
        yield _empty(label, f"one JSON object per line ({schema} schema, see data_schemas/{schema}.schema.json)")


def _skip_rest_of_line(f: Any, chunk: int = 1 << 20) -> int:
    """Read past the end of the current line; the number of bytes skipped, without the newline."""
    skipped = 0
    while True:
        part = f.readline(chunk)
        if not part:
            return skipped
        if part.endswith(b"\n"):
            return skipped + len(part) - 1
        skipped += len(part)


def _parse_line(raw: bytes, where: str) -> Item:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Item(where, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}), "
                                  "expected UTF-8 encoded JSON")
    try:
        return Item(where, json.loads(text))
    except json.JSONDecodeError as exc:
        return Item(where, None, f"invalid JSON at column {exc.colno} ({exc.msg}), expected one JSON object per line")
    except (ValueError, RecursionError) as exc:
        return Item(where, None, f"invalid JSON ({exc}), expected one JSON object per line")


def _iter_json(path: Path, label: str, schema: str, max_line_bytes: int) -> Iterator[Item]:
    """Records of a JSON array file (`FILE:record N`, N counted from 0).

    A `.json` file whose first character is `{` holds JSON Lines, as `datasets`
    also accepts, and is read line by line.
    """
    data = path.read_bytes()
    body = data.removeprefix(b"\xef\xbb\xbf").lstrip()
    if not body:
        yield _empty(label, "a JSON array of records")
        return
    if body.startswith(b"{"):
        yield from _iter_jsonl(path, label, schema, max_line_bytes)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        yield Item(f"{label}:{line}", None, f"not valid UTF-8 (byte 0x{data[exc.start]:02x}), expected UTF-8 encoded JSON")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        yield Item(f"{label}:{exc.lineno}", None,
                    f"invalid JSON at column {exc.colno} ({exc.msg}), expected a JSON array of records")
        return
    except (ValueError, RecursionError) as exc:
        yield Item(label, None, f"invalid JSON ({exc}), expected a JSON array of records")
        return
    if not isinstance(records, list):
        yield Item(label, None, f"got {describe(records)}, expected a JSON array of records")
        return
    if not records:
        yield Item(label, None, "got an empty array, expected a JSON array of at least one record")
        return
    for i, record in enumerate(records):
        yield Item(f"{label}:record {i}", record)


def _iter_parquet(path: Path, label: str, schema: str, check_columns: bool) -> Iterator[Item]:
    """Records of a Parquet file in batches (`FILE:row N`, N counted from 0); missing columns reported once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield Item(label, None, f"not a readable Parquet file ({exc}), expected a Parquet file of records")
        return
    columns = parquet.schema_arrow.names
    expected = REQUIRED_COLUMNS[schema]
    missing = [name for name in expected if name not in columns]
    if check_columns and missing:
        yield Item(label, None, f"wrong columns: found {', '.join(columns) or 'none'}, "
                                 f"expected {', '.join(expected)} (missing {', '.join(missing)})")
        return
    if parquet.metadata.num_rows == 0:
        yield _empty(label, f"at least one row with columns {', '.join(expected)}")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield Item(f"{label}:row {row}", record)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        yield Item(f"{label}:row {row}", None, f"cannot read the rest of the file ({exc}), expected a valid Parquet file")


def iter_file(path: str | Path, schema: str, check_columns: bool, max_line_bytes: int) -> Iterator[Item]:
    """Records of a local file, read by its extension; `check_columns`: Parquet columns must be `schema`'s."""
    label = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        yield Item(label, None, "no such file, expected a .jsonl, .json or .parquet file")
        return
    if path.is_dir():
        yield Item(label, None, "is a directory, expected a .jsonl, .json or .parquet file")
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, label, schema, max_line_bytes)
    elif suffix == ".json":
        yield from _iter_json(path, label, schema, max_line_bytes)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, label, schema, check_columns)
    else:
        yield Item(label, None, f"unsupported file type {suffix or '(no extension)'!r}, "
                                 "expected a .jsonl, .json or .parquet file")


def iter_hub(source: str, split: str) -> Iterator[Item]:
    """Rows of a hub dataset split; DataError when it cannot be loaded."""
    label = f"hub:{source}@{split}"
    dataset = _load_hub_dataset(source, split)
    if len(dataset) == 0:
        yield Item(label, None, "dataset split is empty, expected at least one record")
    for i, record in enumerate(dataset):
        yield Item(f"{label}:row {i}", record)


def _load_hub_dataset(source: str, split: str) -> Any:
    """`datasets.load_dataset(source, split=split)`, failing within seconds when the hub is out of reach.

    Offline (`HF_HUB_OFFLINE=1`) datasets looks only in the local cache; online, the
    hub is probed first, because datasets retries an unreachable hub for ~30 s.
    """
    import datasets

    where = f"hub dataset {source!r} (split {split!r})"
    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if not offline:
        from huggingface_hub import constants

        reason = unreachable(HUB_PROBE_TIMEOUT_S)
        if reason is not None:
            raise DataError(
                f"cannot load {where}: the Hugging Face Hub at {constants.ENDPOINT} is unreachable "
                f"({reason}); pass a local .jsonl/.json/.parquet file, or set HF_HUB_OFFLINE=1 "
                "to use a copy in the local cache"
            )
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
        hint = " with HF_HUB_OFFLINE set, only the local cache is searched;" if offline else ""
        raise DataError(
            f"cannot load {where}:{hint} {type(exc).__name__}: {exc}; "
            "expected a hub dataset id with that split, or a local .jsonl/.json/.parquet file"
        ) from None



_FILE_SUFFIXES = {*LOCAL_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip"}


def is_local(source: str | os.PathLike[str]) -> bool:
    """Whether `source` names a local file rather than a hub dataset id (`name` or `owner/name`)."""
    source = os.fspath(source)
    if Path(source).expanduser().exists() or not is_hub_id(source):
        return True
    return Path(source).suffix.lower() in _FILE_SUFFIXES


__all__ = ["Item", "is_local", "iter_file", "iter_hub"]
