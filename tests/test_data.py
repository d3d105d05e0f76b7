"""Data formats and validation (rlhf/data*.py, scripts/validate_data.py, data_schemas/).

Every problem a user can hit with a data file must come back as a
`FILE:LOCATION: field: got X, expected Y` line, never as a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from rlhf.data import check_file, fingerprint, load_records, validate_file
from rlhf.data_formats import (
    ADAPTERS,
    SCHEMAS,
    hh_rlhf_to_preference,
    load_schema,
    split_implicit_prompt,
    validate_record,
)
from rlhf.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "validate_data.py"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


GOOD = {
    "text": {"text": "Once upon a time."},
    "dialogue": {"messages": [system("Be kind."), user("Hi?"), assistant("Hello!")]},
    "preference": {"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("No.")]},
    "prompt": {"messages": [user("How do I bake bread?")], "category": "normal"},
}


def write_jsonl(path: Path, lines: list) -> Path:
    """Write records (dicts/lists dumped as JSON) or raw strings/bytes, one per line."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode() + b"\n")
            else:
                f.write(json.dumps(line).encode() + b"\n")
    return path


# --------------------------------------------------------------------------- schemas and records


def test_schema_files_are_valid_draft_2020_12_and_accept_their_examples():
    """Each data_schemas/*.schema.json is a valid 2020-12 schema; its examples pass every check."""
    import jsonschema

    for schema in SCHEMAS:
        document = load_schema(schema)
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(document)
        for example in document["examples"]:
            assert validate_record(example, schema) == []


def test_a_non_editable_install_carries_every_module_and_the_schemas(tmp_path):
    """`pip install .` (not editable) installs all of rlhf/ and data_schemas/ as rlhf/schemas/; records validate
    from that install alone: no checkout on sys.path, no editable finder, run from outside the repo (~5 s)."""
    src, target = tmp_path / "src", tmp_path / "site"
    for name in ("rlhf", "data_schemas"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    # A copy, so that the build's build/ and rlhf.egg-info/ land in tmp_path, not in the checkout.
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(target), str(src)]
    out = subprocess.run(pip, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rlhf").rglob("*.py")}
    installed = {p.relative_to(target).as_posix() for p in (target / "rlhf").rglob("*.py")}
    assert modules - installed == set(), "add the missing packages to [tool.setuptools] packages in pyproject.toml"

    # -S: no site module, so neither the checkout's editable finder nor any .pth; the venv's site-packages
    # is appended by hand for jsonschema.
    code = (
        "import json, sys\n"
        "sys.path[:0] = [sys.argv[1]]\n"
        "sys.path.append(sys.argv[2])\n"
        "import rlhf\n"
        "from rlhf.data_formats import SCHEMAS, schema_dir, validate_record\n"
        "good = json.loads(sys.argv[3])\n"
        "print(json.dumps({'rlhf': rlhf.__file__, 'dir': str(schema_dir()),\n"
        "                  'good': {s: validate_record(good[s], s) for s in SCHEMAS},\n"
        "                  'bad': validate_record({'messages': [{'role': 'bot', 'content': 'hi'}]}, 'prompt')}))\n"
    )
    argv = [str(target), sysconfig.get_paths()["purelib"], json.dumps(GOOD)]
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, *argv], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["rlhf"] == str(target / "rlhf" / "__init__.py")
    assert result["dir"] == str(target / "rlhf" / "schemas")
    assert sorted(p.name for p in (target / "rlhf" / "schemas").iterdir()) == sorted(
        p.name for p in (ROOT / "data_schemas").glob("*.schema.json"))
    assert result["good"] == {s: [] for s in SCHEMAS}
    assert result["bad"] == ["messages[0].role: got 'bot', expected one of system, user, assistant"]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_valid_record_has_no_problems_and_extra_keys_are_allowed(schema):
    """A well-formed record of each format passes, even with extra top-level keys."""
    assert validate_record(GOOD[schema], schema) == []
    assert validate_record({**GOOD[schema], "source": "web", "id": 7}, schema) == []


@pytest.mark.parametrize(
    "schema, record, expected",
    [
        ("dialogue", {"messages": [user("a"), {"role": "bot", "content": "b"}]},
         ["messages[1].role: got 'bot', expected one of system, user, assistant"]),
        ("dialogue", {"messages": [user("a"), {"role": "assistant"}]},
         ["messages[1].content: missing, expected a non-empty string"]),
        ("dialogue", {"messages": [user("a"), assistant("")]},
         ["messages[1].content: got '', expected a non-empty string"]),
        ("dialogue", {"messages": [user("a"), assistant("  \n")]},
         ["messages[1].content: got '  \\n', expected a non-empty string"]),
        ("dialogue", {"messages": [user("a"), {"role": "assistant", "content": 3}]},
         ["messages[1].content: got 3, expected a non-empty string"]),
        ("dialogue", {"messages": []}, ["messages: got an empty array, expected at least 2 messages"]),
        ("dialogue", {"messages": "hi"}, ["messages: got 'hi', expected an array of messages"]),
        ("dialogue", {"messages": [user("a"), "b"]},
         ["messages[1]: got 'b', expected a message object {\"role\", \"content\"}"]),
        ("dialogue", {"msgs": []}, ["messages: missing, expected an array of messages"]),
        ("dialogue", [1, 2], ['record: got an array of 2 items, expected a JSON object with key "messages"']),
        ("text", {"text": None}, ["text: got null, expected a non-empty string"]),
        ("text", {"text": ""}, ["text: got '', expected a non-empty string"]),
        ("text", "x", ["record: got 'x', expected a JSON object with key \"text\""]),
    ],
)
def test_schema_violation_messages_name_the_field_what_was_got_and_expected(schema, record, expected):
    """Schema errors read `field.path[i]: got X, expected Y`, one message per mistake."""
    assert validate_record(record, schema) == expected


@pytest.mark.parametrize(
    "schema, record, expected",
    [
        ("dialogue", {"messages": [user("a"), assistant("b"), user("c")]},
         ["messages[2].role: got 'user' in the last turn, expected the last turn to be 'assistant'"]),
        ("dialogue", {"messages": [user("a"), system("s"), assistant("b")]},
         ["messages[1].role: got 'system' after the first turn, expected a system message only as the first turn"]),
        ("dialogue", {"messages": [system("s"), assistant("b")]},
         ["messages: got no user turn, expected at least one user turn"]),
        ("prompt", {"messages": [user("a"), assistant("b")]},
         ["messages[1].role: got 'assistant' in the last turn, expected the last turn to be 'user'"]),
        ("preference", {"prompt": [user("a"), assistant("b")], "chosen": [assistant("c")], "rejected": [assistant("d")]},
         ["prompt[1].role: got 'assistant' in the last turn, expected the last turn to be 'user'"]),
        ("preference", {"prompt": [user("a")], "chosen": [user("c")], "rejected": [assistant("d")]},
         ["chosen[0].role: got 'user', expected 'assistant'"]),
        ("preference", {"prompt": [user("a")], "chosen": [], "rejected": [assistant("d")]},
         ["chosen: got an empty array, expected at least 1 message"]),
    ],
)
def test_turn_order_rules_checked_in_code(schema, record, expected):
    """Rules JSON Schema cannot express: ends with assistant/user, system only first, a user turn exists."""
    assert validate_record(record, schema) == expected


def test_preference_chosen_equal_to_rejected_is_rejected_in_both_forms():
    """A pair whose chosen and rejected are the same teaches the reward model nothing: an error."""
    explicit = {"prompt": [user("a")], "chosen": [assistant("same")], "rejected": [assistant("same")]}
    implicit = {"chosen": [user("a"), assistant("same")], "rejected": [user("a"), assistant("same")]}
    expected = ["rejected: same as chosen, expected a different response"]
    assert validate_record(explicit, "preference") == expected
    assert validate_record(implicit, "preference") == expected


def test_implicit_prompt_form_is_valid_and_splits_into_the_explicit_form():
    """Implicit form: the shared leading turns are the prompt; split_implicit_prompt makes it explicit."""
    shared = [system("Be kind."), user("Hi"), assistant("Hello"), user("Sky?")]
    record = {"chosen": [*shared, assistant("Blue.")], "rejected": [*shared, assistant("No.")], "id": 3}
    assert validate_record(record, "preference") == []
    explicit = split_implicit_prompt(record)
    assert explicit == {"prompt": shared, "chosen": [assistant("Blue.")], "rejected": [assistant("No.")], "id": 3}
    assert validate_record(explicit, "preference") == []
    assert split_implicit_prompt(explicit) == explicit


def test_implicit_prompt_form_must_differ_only_after_the_last_user_turn():
    """Conversations that diverge before a user turn have no well-defined prompt: an error, and split raises."""
    diverge_early = {
        "chosen": [user("Hi"), assistant("Hello"), user("Sky?"), assistant("Blue.")],
        "rejected": [user("Hi"), assistant("Go away"), user("Sky?"), assistant("No.")],
    }
    assert validate_record(diverge_early, "preference") == [
        "chosen[2].role: got 'user' after the shared prompt, "
        "expected only assistant turns after the turns chosen and rejected share"
    ]
    no_shared = {"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("b")]}
    assert validate_record(no_shared, "preference")[0].startswith("chosen[0]: chosen and rejected first differ here")
    with pytest.raises(ValueError, match=r"^chosen\[2\]\.role: got 'user'"):
        split_implicit_prompt(diverge_early)


def test_unknown_schema_is_a_value_error():
    """A typo in a schema name is a programming error, not silently 'valid'."""
    with pytest.raises(ValueError, match="unknown schema 'dialog'"):
        validate_record({}, "dialog")


# --------------------------------------------------------------------------- files


def test_jsonl_problems_carry_file_and_line_and_valid_lines_pass(tmp_path):
    """`FILE:LINE: field: ...` with 1-based line numbers; blank lines skipped but still counted."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        GOOD["dialogue"],
        "",
        {"messages": [user("a"), {"role": "bot", "content": "b"}]},
        "   ",
        {"messages": [user("a"), assistant("")]},
    ])
    assert validate_file(path, "dialogue") == [
        f"{path}:3: messages[1].role: got 'bot', expected one of system, user, assistant",
        f"{path}:5: messages[1].content: got '', expected a non-empty string",
    ]
    assert check_file(path, "dialogue").records == 3


def test_jsonl_broken_json_is_reported_per_line_and_the_rest_still_checked(tmp_path):
    """A syntax error names its line and column; later lines are still validated."""
    path = write_jsonl(tmp_path / "t.jsonl", ['{"text": "a"', {"text": 5}])
    assert validate_file(path, "text") == [
        f"{path}:1: invalid JSON at column 13 (Expecting ',' delimiter), expected one JSON object per line",
        f"{path}:2: text: got 5, expected a non-empty string",
    ]


def test_jsonl_non_utf8_bytes_are_a_problem_not_a_crash(tmp_path):
    """Bytes that are not UTF-8 are reported with the offending byte."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, b'{"text": "caf\xe9"}'])
    assert validate_file(path, "text") == [
        f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 14), expected UTF-8 encoded JSON"
    ]


def test_jsonl_non_object_lines_are_reported(tmp_path):
    """A line holding an array, a string or a number is not a record."""
    path = write_jsonl(tmp_path / "t.jsonl", ["[1,2]", '"x"', "7", "null"])
    expected = 'expected a JSON object with key "text"'
    assert validate_file(path, "text") == [
        f"{path}:1: record: got an array of 2 items, {expected}",
        f"{path}:2: record: got 'x', {expected}",
        f"{path}:3: record: got 7, {expected}",
        f"{path}:4: record: got null, {expected}",
    ]


def test_empty_file_and_blank_only_file_are_reported_as_empty(tmp_path):
    """An empty file (or only blank lines) is one problem `FILE: file is empty, expected ...`."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\n")
    for path in (empty, blank):
        problems = validate_file(path, "prompt")
        assert len(problems) == 1
        assert problems[0].startswith(f"{path}: file is empty, expected one JSON object per line")


def test_oversized_line_is_reported_fast_without_parsing(tmp_path):
    """A 5 MB line exceeds the 4 MiB limit: reported in well under a second; the next line keeps its number."""
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"a" * 5_000_000 + b'"}\n')
        f.write(b'{"text": ""}\n')
    start = time.perf_counter()
    problems = validate_file(path, "text")
    elapsed = time.perf_counter() - start
    assert problems == [
        f"{path}:1: line is 5000012 bytes, expected at most 4194304 bytes per line",
        f"{path}:2: text: got '', expected a non-empty string",
    ]
    assert elapsed < 1.0
    assert validate_file(path, "text", max_line_bytes=10)[0] == f"{path}:1: line is 5000012 bytes, expected at most 10 bytes per line"


def test_max_problems_truncates_with_a_count_of_the_rest(tmp_path):
    """At most max_problems lines, then `... and N more problems` with the exact remainder."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": i} for i in range(25)])
    problems = validate_file(path, "text", max_problems=3)
    assert problems[:3] == [f"{path}:{i}: text: got {i - 1}, expected a non-empty string" for i in (1, 2, 3)]
    assert problems[3:] == ["... and 22 more problems"]
    assert len(validate_file(path, "text")) == 21


def test_json_array_problems_are_located_by_record_index(tmp_path):
    """A .json file is an array of records; problems say `FILE:record N` (index from 0)."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": 5}, [1]]))
    assert validate_file(path, "text") == [
        f"{path}:record 1: text: got 5, expected a non-empty string",
        f'{path}:record 2: record: got an array of 1 item, expected a JSON object with key "text"',
    ]
    assert check_file(path, "text").records == 3


def test_json_file_that_is_not_an_array_or_is_broken(tmp_path):
    """A .json syntax error names its line; a non-array top level and an empty array are one problem each."""
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"text": "a"},\n{"text" "b"}\n]')
    assert validate_file(broken, "text") == [
        f"{broken}:3: invalid JSON at column 9 (Expecting ':' delimiter), expected a JSON array of records"
    ]
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"x"')
    assert validate_file(scalar, "text") == [f"{scalar}: got 'x', expected a JSON array of records"]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert validate_file(empty, "text") == [f"{empty}: got an empty array, expected a JSON array of at least one record"]


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    """A .json starting with `{` is JSON Lines (as datasets accepts): problems by line."""
    path = write_jsonl(tmp_path / "t.json", [{"text": "a"}, {"text": ""}])
    assert validate_file(path, "text") == [f"{path}:2: text: got '', expected a non-empty string"]


def test_parquet_rows_are_validated_by_row_index(tmp_path):
    """Parquet records are checked row by row; problems say `FILE:row N` (index from 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD["dialogue"], {"messages": [user("a"), user("b")]}]), path)
    assert validate_file(path, "dialogue") == [
        f"{path}:row 1: messages[1].role: got 'user' in the last turn, expected the last turn to be 'assistant'"
    ]


def test_parquet_with_wrong_columns_is_reported_once(tmp_path):
    """Missing columns are one problem listing the columns found and expected, not one per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["a", "b", "c"], "answer": ["x", "y", "z"]}), path)
    assert validate_file(path, "preference") == [
        f"{path}: wrong columns: found question, answer, expected chosen, rejected (missing chosen, rejected)"
    ]


def test_unreadable_parquet_unknown_extension_and_missing_file_are_one_problem_each(tmp_path):
    """Garbage in a .parquet, an unsupported extension and a missing file each give one clear line."""
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert validate_file(garbage, "text")[0].startswith(f"{garbage}: not a readable Parquet file")
    csv = tmp_path / "t.csv"
    csv.write_text("text\nhello\n")
    assert validate_file(csv, "text") == [
        f"{csv}: unsupported file type '.csv', expected a .jsonl, .json or .parquet file"
    ]
    missing = tmp_path / "nope.jsonl"
    assert validate_file(missing, "text") == [f"{missing}: no such file, expected a .jsonl, .json or .parquet file"]


# --------------------------------------------------------------------------- adapters

HH_SINGLE = {
    "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
    "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Figure it out yourself.",
}
HH_MULTI = {
    "chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A poem, please.\n\n"
    "Two lines.\n\nAssistant: Roses are red,\nviolets are blue.",
    "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A poem, please.\n\n"
    "Two lines.\n\nAssistant: No.",
}


def test_hh_rlhf_adapter_converts_single_and_multi_turn_pairs():
    """hh-rlhf text -> explicit preference: shared turns become the prompt, the last replies chosen/rejected."""
    assert ADAPTERS["hh-rlhf"] is hh_rlhf_to_preference
    single = hh_rlhf_to_preference(HH_SINGLE)
    assert single == {
        "prompt": [user("What is 2+2?")],
        "chosen": [assistant("4.")],
        "rejected": [assistant("Figure it out yourself.")],
    }
    multi = hh_rlhf_to_preference(HH_MULTI)
    assert multi["prompt"] == [user("Hi"), assistant("Hello! How can I help?"), user("A poem, please.\n\nTwo lines.")]
    assert multi["chosen"] == [assistant("Roses are red,\nviolets are blue.")]
    assert multi["rejected"] == [assistant("No.")]
    for converted in (single, multi):
        assert validate_record(converted, "preference") == []


def test_hh_rlhf_malformed_records_become_problems_on_their_lines(tmp_path):
    """Malformed raw hh-rlhf records are reported per line through the adapter, never a crash."""
    path = write_jsonl(tmp_path / "hh.jsonl", [
        HH_SINGLE,
        {"chosen": 3, "rejected": "x"},
        {"rejected": HH_SINGLE["rejected"]},
        {"chosen": "no markers here", "rejected": "\n\nHuman: a\n\nAssistant: b"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: b"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: b"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"},
        [1],
    ])
    problems = validate_file(path, "preference", adapter="hh-rlhf")
    fmt = r'hh-rlhf text "\n\nHuman: ...\n\nAssistant: ..."'
    assert problems == [
        f"{path}:2: chosen: got 3, expected {fmt}",
        f"{path}:3: chosen: missing, expected {fmt}",
        f"{path}:4: chosen: got 'no markers here' before the first turn, expected {fmt}",
        f"{path}:5: chosen: got a last turn by Human, expected the conversation to end with an 'Assistant:' turn",
        f"{path}:6: rejected: differs from chosen before the last 'Assistant:' turn, "
        "expected both texts to share every turn but the last",
        f"{path}:7: rejected[0].content: got '', expected a non-empty string",
        f"{path}:8: record: got an array of 1 item, expected an hh-rlhf object with string keys 'chosen' and 'rejected'",
    ]


# --------------------------------------------------------------------------- load_records and fingerprint


def test_load_records_returns_every_valid_record_after_the_adapter(tmp_path):
    """A valid file loads completely; the adapter's output is what is returned."""
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_SINGLE, HH_MULTI])
    records = load_records(str(path), "preference", adapter="hh-rlhf")
    assert load_records(path, "preference", adapter="hh-rlhf") == records  # a Path works as well
    assert [r["chosen"] for r in records] == [[assistant("4.")], [assistant("Roses are red,\nviolets are blue.")]]


def test_load_records_raises_data_error_listing_all_problems(tmp_path):
    """One bad record refuses the whole file: DataError with a summary line, then every problem line."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": ""}, {"txt": "b"}])
    with pytest.raises(DataError) as info:
        load_records(str(path), "text")
    assert str(info.value).splitlines() == [
        f"2 problems in {path} (text schema)",
        f"{path}:2: text: got '', expected a non-empty string",
        f"{path}:3: text: missing, expected a non-empty string",
    ]
    assert info.value.problems == str(info.value).splitlines()[1:]


def test_load_records_on_a_missing_local_path_says_so_instead_of_asking_the_hub(tmp_path):
    """A path-like source that does not exist is a DataError naming it, with no hub lookup."""
    for source in (str(tmp_path / "nope.jsonl"), "data/missing.parquet", "./relative"):
        with pytest.raises(DataError, match="no such file"):
            load_records(source, "text")


def test_load_records_unknown_adapter_is_a_data_error(tmp_path):
    """An adapter name that does not exist lists the ones that do."""
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="unknown adapter 'hh', expected one of hh-rlhf"):
        load_records(str(path), "text", adapter="hh")


def test_hub_dataset_fails_within_seconds_offline_or_unreachable(tmp_path):
    """A hub id with HF_HUB_OFFLINE=1 (not cached), or with the hub unreachable, is a prompt, clear DataError."""
    code = (
        "import json, sys, time\n"
        "from rlhf.data import load_records\n"
        "from rlhf.errors import DataError\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    load_records('someone/no-such-dataset', 'text')\n"
        "    print(json.dumps({'error': None}))\n"
        "except DataError as exc:\n"
        "    print(json.dumps({'error': str(exc), 's': time.perf_counter() - start}))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base.update(HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    offline = {**base, "HF_HUB_OFFLINE": "1"}
    unreachable = {**base, "HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: connection refused
    for env, needle in ((offline, "HF_HUB_OFFLINE set"), (unreachable, "is unreachable")):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["error"] and needle in result["error"], result
        assert "someone/no-such-dataset" in result["error"]
        assert result["s"] < 10


def test_hub_rows_are_validated_like_files_with_row_locations(monkeypatch):
    """A hub dataset goes through the same checks; problems say `hub:ID@SPLIT:row N`."""
    import datasets

    rows = [GOOD["dialogue"], {"messages": [user("a"), {"role": "bot", "content": "b"}]}]
    calls = []

    def fake_load_dataset(source, split):
        calls.append((source, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no reachability probe
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError) as info:
        load_records("someone/chats", "dialogue", split="test")
    assert calls == [("someone/chats", "test")]
    assert info.value.problems == [
        "hub:someone/chats@test:row 1: messages[1].role: got 'bot', expected one of system, user, assistant"
    ]
    rows.pop()
    assert load_records("someone/chats", "dialogue") == [GOOD["dialogue"]]


def test_importing_rlhf_data_is_cheap():
    """`import rlhf.data` pulls in neither jsonschema, pyarrow, datasets nor torch."""
    code = "import sys, rlhf.data; print(sorted({'jsonschema', 'pyarrow', 'datasets', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_fingerprint_is_sha256_of_file_bytes_or_hub_id(tmp_path):
    """Local files fingerprint by content; hub ids by id and split; a missing file is a DataError."""
    import hashlib

    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "a"}\n')
    assert fingerprint(str(path)) == hashlib.sha256(b'{"text": "a"}\n').hexdigest()
    assert fingerprint(path) == fingerprint(str(path))  # a Path works as well as a str
    assert fingerprint("Anthropic/hh-rlhf", split="test") == "hub:Anthropic/hh-rlhf@test"
    with pytest.raises(DataError):
        fingerprint(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_cli_valid_files_exit_0_with_ok_lines(tmp_path):
    """`ok: FILE (N records)` per valid file, exit 0."""
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD["prompt"], GOOD["prompt"]])
    b = tmp_path / "b.json"
    b.write_text(json.dumps([GOOD["prompt"]]))
    out = run_cli("--schema", "prompt", str(a), str(b))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [f"ok: {a} (2 records)", f"ok: {b} (1 record)"]


def test_cli_bad_files_exit_1_with_one_line_per_problem_and_no_traceback(tmp_path):
    """Garbage of every kind: exit 1, problem lines truncated by --max-problems, never a traceback."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [b"\xff\xfe\x00", "[1,2]", "{", *([{"text": 1}] * 5)])
    binary = tmp_path / "binary.parquet"
    binary.write_bytes(bytes(range(256)))
    out = run_cli("--schema", "text", "--max-problems", "3", str(bad), str(binary), str(tmp_path / "missing.jsonl"))
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[:4] == [
        f"{bad}:1: not valid UTF-8 (byte 0xff at byte 1), expected UTF-8 encoded JSON",
        f'{bad}:2: record: got an array of 2 items, expected a JSON object with key "text"',
        f"{bad}:3: invalid JSON at column 2 (Expecting property name enclosed in double quotes), "
        "expected one JSON object per line",
        "... and 5 more problems",
    ]
    assert lines[4].startswith(f"{binary}: not a readable Parquet file")
    assert lines[5:] == [f"{tmp_path / 'missing.jsonl'}: no such file, expected a .jsonl, .json or .parquet file"]


def test_cli_adapter_and_usage_errors(tmp_path):
    """--adapter converts before validating; a bad option is a usage error (exit 2), not a traceback."""
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_SINGLE, HH_MULTI])
    out = run_cli("--schema", "preference", "--adapter", "hh-rlhf", str(path))
    assert (out.returncode, out.stdout.strip()) == (0, f"ok: {path} (2 records)")
    out = run_cli("--schema", "dialog", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "invalid choice" in out.stderr
