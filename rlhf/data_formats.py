"""The four data formats: their JSON Schemas, the rules beyond them, and the adapters from raw hub formats.

TRL's standard conversational formats (the JSON Schemas and the rules they
cannot express are in `data_schemas/`, documented in `data_schemas/README.md`):

    text        {"text": str}                                     stage 00
    dialogue    {"messages": [{"role", "content"}, ...]}          stage 01, ends with assistant
    preference  {"prompt": [...], "chosen": [...], "rejected": [...]}
                or {"chosen": [conversation], "rejected": [conversation]}   stage 02
    prompt      {"messages": [...]}                               stages 03/04, ends with user

`validate_record` checks one record and says what is wrong as `field: got X, expected Y`
(`rlhf.data` adds the `FILE:LOCATION: ` in front):

    >>> validate_record({"messages": [{"role": "bot", "content": "hi"}]}, "prompt")
    ["messages[0].role: got 'bot', expected one of system, user, assistant"]

Raw hub formats are converted first by a named adapter (`ADAPTERS`), e.g.
Anthropic's hh-rlhf text into the explicit preference form.

The schema files are read from `rlhf/schemas/` in an installed package
(pyproject.toml installs `data_schemas/` there) and from `data_schemas/` in a
source checkout, editable installs included: `data_schemas/` is the only copy.

Import cost: the standard library only; jsonschema is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

SCHEMAS = ("text", "dialogue", "preference", "prompt")

Record = dict[str, Any]
Adapter = Callable[[Any], Record]


# --------------------------------------------------------------------------- schemas


def schema_dir() -> Path:
    """The folder of the `<schema>.schema.json` files: `rlhf/schemas/` when installed, else the checkout's."""
    package = Path(__file__).resolve().parent
    installed = package / "schemas"
    return installed if installed.is_dir() else package.parent / "data_schemas"


@functools.lru_cache(maxsize=None)
def load_schema(schema: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one format, `data_schemas/<schema>.schema.json`."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}, expected one of {', '.join(SCHEMAS)}")
    return json.loads((schema_dir() / f"{schema}.schema.json").read_text(encoding="utf-8"))


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
        got = "an empty array" if not value else plural(len(value), "message")
        return [f"{where}: got {got}, expected at least {plural(n, 'message')}"]
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


def plural(n: int, noun: str) -> str:
    """`1 problem`, `2 problems`."""
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
        return "an empty array" if not value else f"an array of {plural(len(value), 'item')}"
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


def explicit_pairs(records: Iterable[Record]) -> list[Record]:
    """Validated preference records in the explicit form {prompt, chosen, rejected} (implicit-prompt ones split),
    with their `kind` when they carry one (the demo's: rude / off_topic / adversarial); other keys dropped.

    >>> user = {"role": "user", "content": "Hi?"}
    >>> explicit_pairs([{"chosen": [user, {"role": "assistant", "content": "Hello!"}],
    ...                  "rejected": [user, {"role": "assistant", "content": "Go away."}], "id": 7}])[0]["prompt"]
    [{'role': 'user', 'content': 'Hi?'}]
    """
    pairs = [split_implicit_prompt(r) for r in records]
    return [{k: p[k] for k in ("prompt", "chosen", "rejected", "kind") if k in p} for p in pairs]


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


__all__ = [
    "ADAPTERS",
    "SCHEMAS",
    "Adapter",
    "Record",
    "describe",
    "explicit_pairs",
    "hh_rlhf_to_preference",
    "load_schema",
    "plural",
    "schema_dir",
    "split_implicit_prompt",
    "validate_record",
]
