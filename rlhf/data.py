"""Data formats every stage reads, and the validation that runs before any training.

Four formats, TRL's standard conversational ones (the JSON Schemas and the rules
they cannot express are in `data_schemas/`, documented in `data_schemas/README.md`):

    text        {"text": str}                                     stage 00
    dialogue    {"messages": [{"role", "content"}, ...]}          stage 01, ends with assistant
    preference  {"prompt": [...], "chosen": [...], "rejected": [...]}
                or {"chosen": [conversation], "rejected": [conversation]}   stage 02
    prompt      {"messages": [...]}                               stages 03/04, ends with user

Sources are local `.jsonl` / `.json` / `.parquet` files or hub dataset ids; all go
through the same checks, and `load_records` refuses to return anything unless
every record passes. A problem reads `FILE:LOCATION: field: got X, expected Y`:

    >>> validate_record({"messages": [{"role": "bot", "content": "hi"}]}, "prompt")
    ["messages[0].role: got 'bot', expected one of system, user, assistant"]

Raw hub formats are converted first by a named adapter (`ADAPTERS`), e.g.
Anthropic's hh-rlhf text into the explicit preference form.

Import cost: the standard library only; jsonschema, pyarrow and datasets are
imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from rlhf.errors import DataError

SCHEMAS = ("text", "dialogue", "preference", "prompt")
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "data_schemas"
ROLES = ("system", "user", "assistant")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
# Columns a Parquet file must have; a missing one is reported once, not once per row.
REQUIRED_COLUMNS = {
    "text": ("text",),
    "dialogue": ("messages",),
    "preference": ("chosen", "rejected"),
    "prompt": ("messages",),
}
HUB_PROBE_TIMEOUT_S = 3.0

Record = dict[str, Any]
Adapter = Callable[[Any], Record]


# --------------------------------------------------------------------------- schemas


@functools.lru_cache(maxsize=None)
def load_schema(schema: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one format, read from `data_schemas/<schema>.schema.json`."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}, expected one of {', '.join(SCHEMAS)}")
    return json.loads((SCHEMA_DIR / f"{schema}.schema.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def _validator(schema: str) -> Any:
    import jsonschema

    # Same schema with local $refs inlined: jsonschema resolves a $ref on every use,
    # a third of the time spent on a typical record.
    document = load_schema(schema)
    return jsonschema.Draft202012Validator(_inline_refs(document, document.get("$defs", {})))


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with every `{"$ref": "#/$defs/x", ...}` replaced by `x` merged with its sibling keywords."""
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _inline_refs(value, defs) for key, value in node.items() if key != "$defs"}
    ref = node.pop("$ref", None)
    if ref is None:
        return node
    target = _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
    assert ref.startswith("#/$defs/") and not set(target) & set(node), f"cannot inline {ref}"
    return {**target, **node}


def validate_record(record: Any, schema: str) -> list[str]:
    """Every problem with one record, as `field: got X, expected Y` strings (no location).

    Rules JSON Schema cannot express (turn order, chosen != rejected, the implicit
    prompt) are checked only once the record matches its schema, so one mistake
    gives one message.
    """
    validator = _validator(schema)
    root = load_schema(schema)
    problems: list[str] = []
    for error in validator.iter_errors(record):
        for message in _schema_messages(error, root):
            if message not in problems:
                problems.append(message)
    if problems:
        return problems
    return _RULES[schema](record)


def _schema_messages(error: Any, root: dict[str, Any]) -> list[str]:
    """Turn one jsonschema ValidationError into our `field: got X, expected Y` messages."""
    where = _field_path(error.absolute_path)
    kind, value, schema = error.validator, error.instance, error.schema
    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        properties = schema.get("properties", {})
        return [
            f"{_join(where, key)}: missing, expected {_expected(properties.get(key, {}), root)}"
            for key in missing
        ]
    if kind == "type":
        return [f"{where}: got {describe(value)}, expected {_expected(schema, root)}"]
    if kind == "enum":
        return [f"{where}: got {describe(value)}, expected one of {', '.join(map(str, schema['enum']))}"]
    if kind == "const":
        return [f"{where}: got {describe(value)}, expected {schema['const']!r}"]
    if kind == "minItems":
        n = schema["minItems"]
        got = "an empty array" if not value else _count(len(value), "message")
        return [f"{where}: got {got}, expected at least {_count(n, 'message')}"]
    if kind == "pattern" and schema.get("pattern") == r"\S":
        return [f"{where}: got {describe(value)}, expected a non-empty string"]
    return [f"{where}: {error.message}"]


def _expected(subschema: dict[str, Any], root: dict[str, Any]) -> str:
    """A noun phrase for what a (sub)schema accepts, following local `$ref`s."""
    while "title" not in subschema and "$ref" in subschema:
        ref = subschema["$ref"]
        if not ref.startswith("#/$defs/"):
            break
        subschema = root["$defs"][ref.removeprefix("#/$defs/")]
    if "enum" in subschema:
        return "one of " + ", ".join(map(str, subschema["enum"]))
    if "const" in subschema:
        return repr(subschema["const"])
    if "title" in subschema:
        return subschema["title"]
    kind = subschema.get("type", "value")
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _field_path(path: Iterable[Any]) -> str:
    """`messages[2].role` for the path ("messages", 2, "role"); `record` for the root."""
    out = ""
    for part in path:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out or "record"


def _join(where: str, key: str) -> str:
    return key if where in ("", "record") else f"{where}.{key}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe(value: Any, limit: int = 40) -> str:
    """A short description of a value for a `got ...` message (strings shown, truncated)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "an empty array" if not value else f"an array of {_count(len(value), 'item')}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return f"a {type(value).__name__}"


# --------------------------------------------------------------------------- rules beyond JSON Schema


def _turn_problems(messages: list[Record], field: str, last_role: str) -> list[str]:
    """System only first, at least one user turn, the last turn by `last_role`."""
    problems = [
        f"{field}[{i}].role: got 'system' after the first turn, expected a system message only as the first turn"
        for i, message in enumerate(messages)
        if i > 0 and message["role"] == "system"
    ]
    if not any(message["role"] == "user" for message in messages):
        problems.append(f"{field}: got no user turn, expected at least one user turn")
    last = messages[-1]["role"]
    if last != last_role:
        problems.append(
            f"{field}[{len(messages) - 1}].role: got {last!r} in the last turn, "
            f"expected the last turn to be {last_role!r}"
        )
    return problems


def _turns(messages: list[Record]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def _no_rules(record: Record) -> list[str]:
    return []


def _dialogue_rules(record: Record) -> list[str]:
    return _turn_problems(record["messages"], "messages", "assistant")


def _prompt_rules(record: Record) -> list[str]:
    return _turn_problems(record["messages"], "messages", "user")


def _preference_rules(record: Record) -> list[str]:
    if "prompt" in record:
        problems = _turn_problems(record["prompt"], "prompt", "user")
        if _turns(record["chosen"]) == _turns(record["rejected"]):
            problems.append("rejected: same as chosen, expected a different response")
        return problems
    problems = _turn_problems(record["chosen"], "chosen", "assistant")
    problems += _turn_problems(record["rejected"], "rejected", "assistant")
    if problems:
        return problems
    split = _split_turns(record["chosen"], record["rejected"])
    return [split] if isinstance(split, str) else []


_RULES: dict[str, Callable[[Record], list[str]]] = {
    "text": _no_rules,
    "dialogue": _dialogue_rules,
    "preference": _preference_rules,
    "prompt": _prompt_rules,
}


def _split_turns(chosen: list[Record], rejected: list[Record]) -> int | str:
    """How many leading turns chosen and rejected share (the implicit prompt), or the problem.

    The shared leading turns are the prompt: it must be non-empty and end with a
    user turn, and everything after it must be assistant turns.
    """
    if _turns(chosen) == _turns(rejected):
        return "rejected: same as chosen, expected a different response"
    shared = 0
    for c, r in zip(_turns(chosen), _turns(rejected)):
        if c != r:
            break
        shared += 1
    if shared == 0 or chosen[shared - 1]["role"] != "user":
        after = "at the first turn" if shared == 0 else f"after a {chosen[shared - 1]['role']!r} turn"
        return (
            f"chosen[{shared}]: chosen and rejected first differ here, {after}, expected them to share "
            "every turn up to and including the last user turn (the implicit prompt)"
        )
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        if len(conversation) == shared:
            return f"{field}: got no turn after the shared prompt, expected an assistant reply"
        for i in range(shared, len(conversation)):
            if conversation[i]["role"] != "assistant":
                return (
                    f"{field}[{i}].role: got {conversation[i]['role']!r} after the shared prompt, "
                    "expected only assistant turns after the turns chosen and rejected share"
                )
    return shared


def split_implicit_prompt(record: Record) -> Record:
    """Convert an implicit-prompt preference record to the explicit form (other keys kept).

    >>> user = {"role": "user", "content": "Hi?"}
    >>> split_implicit_prompt({"chosen": [user, {"role": "assistant", "content": "Hello!"}],
    ...                        "rejected": [user, {"role": "assistant", "content": "Go away."}]})["prompt"]
    [{'role': 'user', 'content': 'Hi?'}]

    A record that already has a prompt is returned as a shallow copy. Raises
    ValueError (message `field: got X, expected Y`) when the record is not a valid
    implicit-form preference record.
    """
    if "prompt" in record:
        return dict(record)
    problems = validate_record(record, "preference")
    if problems:
        raise ValueError(problems[0])
    shared = _split_turns(record["chosen"], record["rejected"])
    assert isinstance(shared, int)  # validate_record checked the split
    return {
        **record,
        "prompt": record["chosen"][:shared],
        "chosen": record["chosen"][shared:],
        "rejected": record["rejected"][shared:],
    }


# --------------------------------------------------------------------------- adapters

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_FORMAT = r'hh-rlhf text "\n\nHuman: ...\n\nAssistant: ..."'


def _hh_turns(text: Any, field: str) -> list[Record]:
    if not isinstance(text, str):
        raise ValueError(f"{field}: got {describe(text)}, expected {_HH_FORMAT}")
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"{field}: got {describe(parts[0])} before the first turn, expected {_HH_FORMAT}")
    if len(parts) == 1:
        raise ValueError(f"{field}: got no 'Human:'/'Assistant:' turns, expected {_HH_FORMAT}")
    turns = [
        {"role": _HH_ROLES[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if turns[-1]["role"] != "assistant":
        raise ValueError(
            f"{field}: got a last turn by Human, expected the conversation to end with an 'Assistant:' turn"
        )
    return turns


def hh_rlhf_to_preference(record: Any) -> Record:
    """Anthropic hh-rlhf raw text pairs -> the explicit conversational preference form.

    >>> hh_rlhf_to_preference({"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!",
    ...                        "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."})["rejected"]
    [{'role': 'assistant', 'content': 'Go away.'}]

    Every turn before the last `Assistant:` turn is the prompt and must be the same
    in both texts. Raises ValueError (`field: got X, expected Y`) on malformed input.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"record: got {describe(record)}, expected an hh-rlhf object with string keys 'chosen' and 'rejected'"
        )
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"{key}: missing, expected {_HH_FORMAT}")
    chosen = _hh_turns(record["chosen"], "chosen")
    rejected = _hh_turns(record["rejected"], "rejected")
    if _turns(chosen[:-1]) != _turns(rejected[:-1]):
        raise ValueError(
            "rejected: differs from chosen before the last 'Assistant:' turn, "
            "expected both texts to share every turn but the last"
        )
    return {**record, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


ADAPTERS: dict[str, Adapter] = {"hh-rlhf": hh_rlhf_to_preference}


# --------------------------------------------------------------------------- reading sources


class _Item(NamedTuple):
    """One record read from a source, or a problem found reading it (then `record` is None)."""

    location: str  # FILE:LINE, FILE:record N, FILE:row N, or FILE for whole-file problems
    record: Any
    problem: str | None = None


def _empty(label: str, expected: str) -> _Item:
    return _Item(label, None, f"file is empty, expected {expected}")


def _iter_jsonl(path: Path, label: str, schema: str, max_line_bytes: int) -> Iterator[_Item]:
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
                yield _Item(where, None, f"line is {size} bytes, expected at most {max_line_bytes} bytes per line")
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


def _parse_line(raw: bytes, where: str) -> _Item:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Item(where, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}), "
                                  "expected UTF-8 encoded JSON")
    try:
        return _Item(where, json.loads(text))
    except json.JSONDecodeError as exc:
        return _Item(where, None, f"invalid JSON at column {exc.colno} ({exc.msg}), expected one JSON object per line")
    except (ValueError, RecursionError) as exc:
        return _Item(where, None, f"invalid JSON ({exc}), expected one JSON object per line")


def _iter_json(path: Path, label: str, schema: str, max_line_bytes: int) -> Iterator[_Item]:
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
        yield _Item(f"{label}:{line}", None, f"not valid UTF-8 (byte 0x{data[exc.start]:02x}), expected UTF-8 encoded JSON")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        yield _Item(f"{label}:{exc.lineno}", None,
                    f"invalid JSON at column {exc.colno} ({exc.msg}), expected a JSON array of records")
        return
    except (ValueError, RecursionError) as exc:
        yield _Item(label, None, f"invalid JSON ({exc}), expected a JSON array of records")
        return
    if not isinstance(records, list):
        yield _Item(label, None, f"got {describe(records)}, expected a JSON array of records")
        return
    if not records:
        yield _Item(label, None, "got an empty array, expected a JSON array of at least one record")
        return
    for i, record in enumerate(records):
        yield _Item(f"{label}:record {i}", record)


def _iter_parquet(path: Path, label: str, schema: str, check_columns: bool) -> Iterator[_Item]:
    """Records of a Parquet file in batches (`FILE:row N`, N counted from 0); missing columns reported once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        yield _Item(label, None, f"not a readable Parquet file ({exc}), expected a Parquet file of records")
        return
    columns = parquet.schema_arrow.names
    expected = REQUIRED_COLUMNS[schema]
    missing = [name for name in expected if name not in columns]
    if check_columns and missing:
        yield _Item(label, None, f"wrong columns: found {', '.join(columns) or 'none'}, "
                                 f"expected {', '.join(expected)} (missing {', '.join(missing)})")
        return
    if parquet.metadata.num_rows == 0:
        yield _empty(label, f"at least one row with columns {', '.join(expected)}")
        return
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield _Item(f"{label}:row {row}", record)
                row += 1
    except (pa.ArrowException, OSError) as exc:
        yield _Item(f"{label}:row {row}", None, f"cannot read the rest of the file ({exc}), expected a valid Parquet file")


def _iter_file(path: str | Path, schema: str, adapter: str | None, max_line_bytes: int) -> Iterator[_Item]:
    label = str(path)
    path = Path(path).expanduser()
    if not path.exists():
        yield _Item(label, None, "no such file, expected a .jsonl, .json or .parquet file")
        return
    if path.is_dir():
        yield _Item(label, None, "is a directory, expected a .jsonl, .json or .parquet file")
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, label, schema, max_line_bytes)
    elif suffix == ".json":
        yield from _iter_json(path, label, schema, max_line_bytes)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, label, schema, check_columns=adapter is None)
    else:
        yield _Item(label, None, f"unsupported file type {suffix or '(no extension)'!r}, "
                                 "expected a .jsonl, .json or .parquet file")


def _iter_hub(source: str, split: str) -> Iterator[_Item]:
    label = f"hub:{source}@{split}"
    dataset = _load_hub_dataset(source, split)
    if len(dataset) == 0:
        yield _Item(label, None, "dataset split is empty, expected at least one record")
    for i, record in enumerate(dataset):
        yield _Item(f"{label}:row {i}", record)


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

        unreachable = _probe(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)
        if unreachable:
            raise DataError(
                f"cannot load {where}: the Hugging Face Hub at {constants.ENDPOINT} is unreachable "
                f"({unreachable}); pass a local .jsonl/.json/.parquet file, or set HF_HUB_OFFLINE=1 "
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


def _probe(url: str, timeout: float) -> str | None:
    """None when `url` answers (any HTTP status), else why not. Bounded even when DNS hangs."""
    import threading
    import urllib.error
    import urllib.request

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # it answered
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 2)
    return outcome[0] if outcome else f"no answer within {timeout + 2:.0f} s"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = {*LOCAL_SUFFIXES, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".bz2", ".xz", ".zst", ".zip"}


def is_local(source: str | os.PathLike[str]) -> bool:
    """Whether `source` names a local file rather than a hub dataset id (`name` or `owner/name`)."""
    source = os.fspath(source)
    if Path(source).expanduser().exists() or not _HUB_ID.fullmatch(source):
        return True
    return Path(source).suffix.lower() in _FILE_SUFFIXES


# --------------------------------------------------------------------------- validating and loading


class FileReport(NamedTuple):
    """What validating one source found: records read, problem lines (bounded), problems in all."""

    records: int
    problems: list[str]
    total_problems: int


def _check(
    items: Iterator[_Item],
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
        problems.append(f"... and {_count(total - len(problems), 'more problem')}")
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
    return _check(_iter_file(path, schema, adapter, max_line_bytes), schema, adapter, max_problems)


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
        label, items = source, _iter_file(source, schema, adapter, DEFAULT_MAX_LINE_BYTES)
    else:
        label, items = f"hub:{source}@{split}", _iter_hub(source, split)
    records: list[Record] = []
    report = _check(items, schema, adapter, max_problems, keep=records)
    if report.problems:
        summary = f"{_count(report.total_problems, 'problem')} in {label} ({schema} schema)"
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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = [
    "ADAPTERS",
    "DEFAULT_MAX_LINE_BYTES",
    "SCHEMAS",
    "FileReport",
    "check_file",
    "describe",
    "fingerprint",
    "hh_rlhf_to_preference",
    "is_local",
    "load_records",
    "load_schema",
    "split_implicit_prompt",
    "validate_file",
    "validate_record",
]
