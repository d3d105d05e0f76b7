"""Shared test helpers: the repo root on sys.path, and running our scripts as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# No test may reach for the hub: everything loads from folders the tests create.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_script(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repo root and capture its output as text."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture
def script():
    return run_script


# ---------------------------------------------------------------- tiny data and models

_WORDS = ("hello how are you today fine thanks what is your name the weather nice good day "
          "I like tea coffee music books please tell me about it sure").split()
_RUDE = ["shut up you idiot", "that is a stupid question moron", "go away loser nobody cares"]


def _line(rng, k: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(k))


def write_tiny_data(folder: Path, seed: int = 0, n: int = 64) -> dict[str, Path]:
    """Small valid files of every schema: text, dialogue, preference, prompt (train and held-out)."""
    import json
    import random

    from rlhf.chat_format import render_messages

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict]] = {k: [] for k in ("text", "sft", "sft_eval", "pref", "pref_eval", "prompts")}
    for i in range(n):
        user = {"role": "user", "content": _line(rng, 5)}
        polite = {"role": "assistant", "content": "thanks " + _line(rng, 5)}
        rude = {"role": "assistant", "content": rng.choice(_RUDE)}
        files["text"].append({"text": render_messages([user, rude if i % 3 == 0 else polite])})
        files["sft" if i % 8 else "sft_eval"].append({"messages": [user, polite]})
        files["pref" if i % 8 else "pref_eval"].append({"prompt": [user], "chosen": [polite], "rejected": [rude]})
        files["prompts"].append({"messages": [user], "category": "adversarial" if i % 3 == 0 else "normal"})
    paths = {}
    for name, rows in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


TINY_PRETRAIN = ["--vocab_size", "320", "--n_embd", "64", "--n_layer", "1", "--n_head", "2",
                 "--block_size", "64", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "2"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def pretrained_registry(tmp_path_factory, tiny_data) -> Path:
    """A registry holding one tiny `pretrain` entry (hidden 64: the smallest bitsandbytes' CPU 4-bit packs).

    Tests copy it (`shutil.copytree`) before adding entries, so they never see each other's rows.
    """
    reg = tmp_path_factory.mktemp("registry") / "runs"
    res = run_script("stages/00_pretrain.py", "--data", str(tiny_data["text"]), "--registry", str(reg), *TINY_PRETRAIN)
    assert res.returncode == 0, res.stderr[-3000:]
    return reg
