"""Stage 00 (pre-training) end to end through its real command line, on a tiny config.

The session fixture `pretrained_registry` (conftest.py) has already run
`stages/00_pretrain.py` once; these tests check what that run left behind, then
drive the script through reuse, bad input and an interrupted-then-resumed run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_PRETRAIN, run_script
from rlhf import chat_format
from rlhf.registry import Registry

pytestmark = pytest.mark.slow


def _copy(registry: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(registry, dst)
    return dst


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _assert_clean_failure(res: subprocess.CompletedProcess) -> None:
    """Non-zero exit, exactly one `error:` message, and no traceback."""
    assert res.returncode != 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(_error_lines(res.stderr)) == 1, res.stderr[-2000:]


def test_pretrain_registers_a_complete_entry(pretrained_registry):
    """The run registers one `pretrain` entry whose folder holds safetensors, a usable tokenizer and metrics."""
    from transformers import AutoTokenizer

    entries = Registry(pretrained_registry).entries()
    assert [e.stage for e in entries] == ["pretrain"]
    entry = entries[0]
    assert entry.parents == []
    assert (entry.path / "model.safetensors").is_file()
    assert entry.manifest and "model.safetensors" in entry.manifest
    for key in ("train_loss", "eval_loss", "eval_perplexity", "n_params", "steps"):
        assert key in entry.metrics, key
    assert entry.metrics["steps"] == 6
    assert json.loads((entry.path / "metrics.json").read_text())["eval_loss"] == pytest.approx(entry.metrics["eval_loss"])
    assert Registry(pretrained_registry).verify() == {}

    tok = AutoTokenizer.from_pretrained(entry.path)
    assert tok.pad_token == chat_format.PAD and tok.eos_token == chat_format.EOS
    assert tok.pad_token_id != tok.eos_token_id, "pad must never be EOS: masking pads would mask ends of turns"
    assert tok.chat_template == chat_format.CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == chat_format.render_messages(msgs)


def test_registry_cli_lists_the_entry_as_json(pretrained_registry):
    """`scripts/registry.py list --json` shows the entry with its stage, path and metrics."""
    res = run_script("scripts/registry.py", "list", "--registry", str(pretrained_registry), "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    (entry,) = Registry(pretrained_registry).entries()
    assert [e["id"] for e in listed] == [entry.id]
    assert listed[0]["stage"] == "pretrain" and listed[0]["path"] == str(entry.path)
    assert listed[0]["metrics"]["eval_loss"] == pytest.approx(entry.metrics["eval_loss"])


def test_reuse_returns_the_same_entry_without_training(pretrained_registry, tiny_data, tmp_path):
    """`--reuse` with an identical config and data adds no row and names the existing entry."""
    reg = _copy(pretrained_registry, tmp_path)
    (entry,) = Registry(reg).entries()
    res = run_script("stages/00_pretrain.py", "--data", str(tiny_data["text"]), "--registry", str(reg),
                     *TINY_PRETRAIN, "--reuse")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"reusing {entry.ref}" in res.stderr
    assert "train_runtime" not in res.stdout + res.stderr  # the Trainer never ran
    assert [e.id for e in Registry(reg).entries()] == [entry.id]


def test_broken_data_line_fails_with_file_and_line(pretrained_registry, tiny_data, tmp_path):
    """A broken JSON line exits non-zero with one `FILE:LINE:` message, no traceback, no new row."""
    reg = _copy(pretrained_registry, tmp_path)
    lines = tiny_data["text"].read_text().splitlines(keepends=True)
    lines[2] = '{"text": "unterminated\n'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines))
    res = run_script("stages/00_pretrain.py", "--data", str(bad), "--registry", str(reg), *TINY_PRETRAIN)
    _assert_clean_failure(res)
    assert f"{bad}:3:" in res.stderr and "invalid JSON" in res.stderr
    assert len(Registry(reg).entries()) == 1


def test_config_typo_fails_naming_file_and_line(pretrained_registry, tmp_path):
    """A YAML key that is not a config field exits non-zero naming `file:line` and the field."""
    reg = _copy(pretrained_registry, tmp_path)
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text("vocab_size: 320\nlerning_rate: 1.0e-3\n")
    res = run_script("stages/00_pretrain.py", "--config", str(cfg), "--registry", str(reg))
    _assert_clean_failure(res)
    assert f"{cfg}:2: unknown field 'lerning_rate'" in res.stderr
    assert len(Registry(reg).entries()) == 1


# Runs a stage script as `python SCRIPT ARGS...` would, except that the process SIGKILLs itself right after
# the Trainer has written its first complete checkpoint: a crash at a known point, with no timing race.
_DIE_AFTER_FIRST_CHECKPOINT = """
import os, runpy, signal, sys
from transformers import Trainer
_save = Trainer._save_checkpoint
def _save_then_die(self, *args, **kwargs):
    _save(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_checkpoint = _save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_run_resumes_from_its_checkpoint(pretrained_registry, tiny_data, tmp_path):
    """SIGKILL right after the first checkpoint, then `--resume`: exactly one new row, all 6 steps done,
    nothing left in .work/.staging; and the resumed run lands where the uninterrupted run of the same
    config (the `pretrained_registry` fixture) did."""
    reg = tmp_path / "runs"
    args = ["stages/00_pretrain.py", "--data", str(tiny_data["text"]), "--registry", str(reg), *TINY_PRETRAIN]
    killed = run_script("-c", _DIE_AFTER_FIRST_CHECKPOINT, *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in reg.glob(".work/pretrain-*/checkpoint-*")] == ["checkpoint-3"]
    assert Registry(reg).entries() == []

    res = run_script(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "checkpoint-3" in res.stderr
    (entry,) = Registry(reg).entries()
    assert entry.metrics["steps"] == 6
    (uninterrupted,) = Registry(pretrained_registry).entries()
    assert entry.metrics["eval_loss"] == pytest.approx(uninterrupted.metrics["eval_loss"], rel=1e-6)
    assert not any((reg / ".work").glob("*")), "the run's work folder outlived its registration"
    assert not any((reg / ".staging").glob("*")), "staging leftovers"
