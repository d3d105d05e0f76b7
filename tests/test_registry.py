"""The checkpoint registry: atomic registration, tamper detection, concurrency, lineage, moves."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from rlhf.errors import RegistryError
from rlhf.registry import Registry


def _stage_files(reg: Registry, stage: str, content: str = "weights") -> Path:
    staged = reg.staging_dir(stage)
    (staged / "model.safetensors").write_text(content)
    (staged / "sub").mkdir()
    (staged / "sub" / "tokenizer.json").write_text("{}")
    return staged


def _register(reg: Registry, stage: str = "pretrain", parents: list[str] | None = None, **kw):
    return reg.register(stage, _stage_files(reg, stage), parents=parents or [], config={"lr": 1e-3},
                        metrics={"eval_loss": 1.5}, data_fingerprints={"data": "abc"}, **kw)


def test_register_moves_folder_into_place_and_records_everything(tmp_path):
    reg = Registry(tmp_path / "runs")
    e = _register(reg)
    assert e.path == tmp_path / "runs" / "pretrain" / e.id
    assert set(e.manifest) == {"model.safetensors", "sub/tokenizer.json"}
    assert e.config == {"lr": 1e-3} and e.metrics == {"eval_loss": 1.5}
    assert e.data_fingerprints == {"data": "abc"}
    assert "torch" in e.versions and e.created_at
    assert not list((tmp_path / "runs" / ".staging").iterdir())
    assert reg.get("pretrain:latest").id == e.id


def test_crash_between_rename_and_insert_leaves_no_row_and_cleanup_removes_folder(tmp_path):
    """A process dying after the rename but before the commit must leave no row pointing anywhere."""
    code = textwrap.dedent(f"""
        import os, sys; sys.path.insert(0, {str(ROOT)!r})
        from rlhf.registry import Registry
        reg = Registry({str(tmp_path / 'runs')!r})
        s = reg.staging_dir('pretrain'); (s / 'w.bin').write_text('x')
        rename = os.replace
        def rename_then_die(src, dst):  # the process dies right after the folder is renamed into place
            rename(src, dst)
            os._exit(17)
        os.replace = rename_then_die
        reg.register('pretrain', s, parents=[], config={{}}, metrics={{}})
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 17, res.stderr
    reg = Registry(tmp_path / "runs")
    assert reg.entries() == []
    orphans = list((tmp_path / "runs" / "pretrain").iterdir())
    assert len(orphans) == 1  # the renamed folder, with no row
    removed = reg.cleanup()
    assert orphans[0] in removed and not orphans[0].exists()
    with pytest.raises(RegistryError, match="no 'pretrain' entry"):
        reg.get("pretrain:latest")


def test_modified_or_missing_artifact_is_refused_on_load_and_reported_by_verify(tmp_path):
    reg = Registry(tmp_path / "runs")
    a, b = _register(reg), _register(reg)
    (a.path / "model.safetensors").write_text("tampered")
    (b.path / "sub" / "tokenizer.json").unlink()
    with pytest.raises(RegistryError, match="modified"):
        reg.get(a.ref)
    with pytest.raises(RegistryError, match="tokenizer.json: missing"):
        reg.get(b.ref)
    assert set(reg.verify()) == {a.ref, b.ref}
    res = run_script("scripts/registry.py", "verify", "--registry", str(tmp_path / "runs"))
    assert res.returncode == 1
    assert f"{a.ref}: model.safetensors: modified" in res.stdout
    assert f"{b.ref}: sub/tokenizer.json: missing" in res.stdout


def _register_in_process(root: str, i: int) -> str:
    reg = Registry(root)
    return _register(reg, "sft" if i % 2 else "reward").id


def test_four_processes_registering_at_once_all_land(tmp_path):
    root = str(tmp_path / "runs")
    Registry(root)
    with mp.get_context("spawn").Pool(4) as pool:
        ids = pool.starmap(_register_in_process, [(root, i) for i in range(4)])
    reg = Registry(root)
    assert sorted(e.id for e in reg.entries()) == sorted(ids)
    assert reg.verify() == {}


def test_lineage_follows_parents_and_stage_checks_refuse_wrong_stage(tmp_path):
    reg = Registry(tmp_path / "runs")
    base = _register(reg, "pretrain")
    sft = _register(reg, "sft", parents=[base.ref])
    rm = _register(reg, "reward", parents=[sft.ref])
    ppo = _register(reg, "ppo", parents=[sft.ref, rm.ref])
    assert [e.id for e in reg.lineage(ppo.ref)] == [ppo.id, sft.id, rm.id, base.id]
    with pytest.raises(RegistryError, match="is a 'reward' entry, but this needs a 'sft'"):
        reg.get(rm.id, stage="sft")
    with pytest.raises(RegistryError, match="not 'sft'"):
        reg.get(f"sft:{rm.id}")
    with pytest.raises(RegistryError, match="no entry with id"):
        reg.get("sft:doesnotexist")


def test_registry_from_the_future_is_refused_not_migrated(tmp_path):
    Registry(tmp_path / "runs")
    db = tmp_path / "runs" / "registry.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RegistryError, match="schema version 99, newer"):
        Registry(tmp_path / "runs")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta").fetchone()[0] == "99"


def test_moved_registry_still_lists_verifies_and_loads(tmp_path):
    reg = Registry(tmp_path / "a" / "runs")
    e = _register(reg)
    shutil.move(str(tmp_path / "a" / "runs"), str(tmp_path / "b"))
    moved = Registry(tmp_path / "b")
    assert moved.get(e.ref).path == tmp_path / "b" / "pretrain" / e.id
    assert moved.verify() == {}
    res = run_script("scripts/registry.py", "list", "--registry", str(tmp_path / "b"), "--json")
    rows = json.loads(res.stdout)
    assert [r["id"] for r in rows] == [e.id] and rows[0]["path"].startswith(str(tmp_path / "b"))
    assert {"id", "stage", "parents", "path", "config", "metrics", "created_at"} <= set(rows[0])


def test_cli_list_json_is_empty_array_and_unknown_ref_is_one_line(tmp_path):
    res = run_script("scripts/registry.py", "list", "--registry", str(tmp_path / "r"), "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    res = run_script("scripts/registry.py", "show", "sft:latest", "--registry", str(tmp_path / "r"))
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: sft:latest: no 'sft' entry") and "Traceback" not in res.stderr


def test_registry_path_that_cannot_be_a_folder_is_reported_before_any_work(tmp_path):
    """A registry path blocked by a file (as on a full or read-only disk) gives one clear message."""
    (tmp_path / "blocked").write_text("not a folder")
    with pytest.raises(RegistryError, match="cannot create registry folder"):
        Registry(tmp_path / "blocked" / "runs")
