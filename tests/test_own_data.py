"""A user's own data, as a new user would bring it: no stage falls back to the demo's files, held-out data comes
from the user's data when no eval_data is given, and invalid records are refused or, on request, skipped and
counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, load_stage, run_script
from rlhf.data import holdout_split, records_fingerprint
from rlhf.errors import DataError
from rlhf.registry import Registry

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
QUICK_SFT = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--gen_eval_samples", "0"]


def _dialogues(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question number {i} about tea"},
                          {"role": "assistant", "content": f"thanks, answer number {i} is fine"}]} for i in range(n)]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_holdout_split_is_seeded_bounded_and_fingerprinted():
    """The held-out share: `fraction` of the rows, at least 8, never more than half, the same rows for the same
    seed, the rest for training in their order; the fingerprints identify exactly those rows."""
    rows = [{"text": str(i)} for i in range(100)]
    train, held, info = holdout_split(rows, 0.1, seed=1)
    assert (len(train), len(held)) == (90, 10) and info["train_rows"] == 90 and info["eval_rows"] == 10
    assert sorted(train + held, key=lambda r: int(r["text"])) == rows
    assert [int(r["text"]) for r in train] == sorted(int(r["text"]) for r in train)
    assert holdout_split(rows, 0.1, seed=1)[1] == held and holdout_split(rows, 0.1, seed=2)[1] != held
    assert info["eval_fingerprint"] == records_fingerprint(held) != records_fingerprint(held[::-1])
    assert len(holdout_split(rows, 0.01, seed=0)[1]) == 8  # the floor
    assert len(holdout_split(rows[:10], 0.01, seed=0)[1]) == 5  # never more than half
    with pytest.raises(DataError, match="too few to hold some out"):
        holdout_split(rows[:1], 0.1, seed=0)


@pytest.mark.slow
def test_sft_with_only_model_and_data_evaluates_on_a_split_of_that_data(pretrained_registry, tmp_path):
    """`01_sft.py --model M --data mine.jsonl` and nothing else: the held-out metrics come from a recorded split of
    mine.jsonl (fraction, seed, row counts, fingerprints), the log says so, and the entry's recorded config names no
    demo file. Stage 04 then rebuilds that same split as its held-out dialogues."""
    reg = tmp_path / "runs"
    shutil.copytree(pretrained_registry, reg)
    rows = _dialogues(40)
    data = _write(tmp_path / "mine.jsonl", rows)
    res = run_script("stages/01_sft.py", "--model", "pretrain:latest", "--data", str(data), "--registry", str(reg),
                     *QUICK_SFT, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"no eval_data: 8 of the 40 records of {data} held out for evaluation" in res.stderr
    (sft,) = Registry(reg).entries("sft")
    split = sft.config["heldout_split"]
    train, held, _ = holdout_split(rows, 0.05, seed=0)
    assert split == {"source": "data", "fraction": 0.05, "seed": 0, "train_rows": 32, "eval_rows": 8,
                     "train_fingerprint": records_fingerprint(train), "eval_fingerprint": records_fingerprint(held)}
    assert sft.data_fingerprints == {"data": sft.data_fingerprints["data"]}  # no eval_data source was read
    assert sft.metrics["eval_loss"] > 0 and sft.config["data_skipped"] == {"data": 0}
    assert "data/demo" not in json.dumps(sft.config), sft.config
    assert not {"registry", "resume", "reuse"} & set(sft.config)

    compare = load_stage("04_compare.py")
    cfg = compare.CompareStageConfig(registry=str(reg), prompts=str(data), ppo_model="")
    dialogues, source = compare.heldout_dialogues(cfg, Registry(reg), sft.ref)
    assert dialogues == held and "the 8 dialogues" in source
    _write(data, rows[::-1])  # the user's file changed since: the split cannot be rebuilt, and it says so
    with pytest.raises(DataError, match="differs from the data"):
        compare.heldout_dialogues(cfg, Registry(reg), sft.ref)


@pytest.mark.slow
def test_invalid_records_are_refused_by_default_and_skipped_and_counted_on_request(pretrained_registry, tmp_path):
    """Two bad records among good ones: `on_invalid: error` (the default) refuses the file naming both lines and
    registers nothing; `on_invalid: skip` trains on the rest, logs the count with the reasons, and records 2."""
    reg = tmp_path / "runs"
    shutil.copytree(pretrained_registry, reg)
    rows: list = _dialogues(30)
    rows[2] = {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows[6] = "{not json"
    data = _write(tmp_path / "mine.jsonl", rows)
    args = ["stages/01_sft.py", "--model", "pretrain:latest", "--data", str(data), "--registry", str(reg), *QUICK_SFT]

    res = run_script(*args, env=ONE_THREAD)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{data}:3: messages[0].role" in res.stderr and f"{data}:7:" in res.stderr, res.stderr[-2000:]
    assert Registry(reg).entries("sft") == []

    res = run_script(*args, "--on_invalid", "skip", env=ONE_THREAD)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{data}: skipped 2 invalid record(s) of 30 (on_invalid: skip); first: {data}:3:" in res.stderr
    (sft,) = Registry(reg).entries("sft")
    assert sft.config["data_skipped"] == {"data": 2} and sft.config["on_invalid"] == "skip"
    assert sft.config["heldout_split"]["train_rows"] + sft.config["heldout_split"]["eval_rows"] == 28


@pytest.mark.parametrize("stage, field", [("03_ppo.py", "data"), ("04_compare.py", "prompts"),
                                          ("00_pretrain.py", "data"), ("01_sft.py", "data"), ("02_reward.py", "data")])
def test_a_stage_without_its_data_stops_naming_the_field(stage, field, tmp_path):
    """No stage reads the demo's files unless told to: without its data it stops at once, naming the field."""
    res = run_script(f"stages/{stage}", "--registry", str(tmp_path / "runs"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {field}: not set; give it in the config file ({field}: ...) or as --{field}" in res.stderr


def test_no_stage_default_names_a_demo_file():
    """The demo's paths live in configs/demo/*.yaml; the stage configs' defaults name none."""
    import dataclasses

    for stage in ("00_pretrain.py", "01_sft.py", "02_reward.py", "03_ppo.py", "04_compare.py"):
        module = load_stage(stage)
        config = next(v for k, v in vars(module).items() if k.endswith("Config") and dataclasses.is_dataclass(v)
                      and v.__module__ == module.__name__)
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        assert not [k for k, v in defaults.items() if isinstance(v, str) and "data/demo" in v], (stage, defaults)
    demo = "".join(p.read_text() for p in (ROOT / "configs" / "demo").glob("*.yaml"))
    assert "data/demo/sft_train.jsonl" in demo and "data/demo/prompts_heldout.jsonl" in demo
