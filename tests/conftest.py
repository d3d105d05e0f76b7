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


# ---------------------------------------------------------------- the device of in-process tests

# Tests that build models in this process take the `device` fixture: RLHF_DEVICE (`cpu`, the default, or `cuda`,
# `cuda:N`). Taking it marks a test `device`, so `RLHF_DEVICE=cuda pytest -m device tests` runs exactly those on
# a GPU (scripts/gpu_check.sh). Stage command lines that tests run pick their device as users' runs do: CUDA when
# there is one. Asking for CUDA where there is none stops the session with one line; it never falls back.


def pytest_configure(config):
    config.addinivalue_line("markers", "device: builds models on RLHF_DEVICE (takes the `device` fixture)")
    wanted = os.environ.get("RLHF_DEVICE", "cpu")
    if wanted == "cpu":
        return
    if wanted != "cuda" and not (wanted.startswith("cuda:") and wanted[5:].isdigit()):
        raise pytest.UsageError(f"RLHF_DEVICE={wanted!r}: expected cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise pytest.UsageError(f"RLHF_DEVICE={wanted} but torch.cuda.is_available() is False "
                                f"(torch {torch.__version__}); the device tests do not fall back to the CPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device():
    """The torch.device this test builds its models on (RLHF_DEVICE, default cpu)."""
    import torch

    return torch.device(os.environ.get("RLHF_DEVICE", "cpu"))


# ---------------------------------------------------------------- running scripts


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


def register_fake_reward(registry_root: Path, seed: int = 0) -> str:
    """A `reward` entry of the adapter kind on `sft:latest`: a random LoRA adapter and score head.

    For tests of later stages that must not depend on training a reward model.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from rlhf.registry import Registry

    reg = Registry(registry_root)
    sft = reg.get("sft:latest")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft.path))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    staged = reg.staging_dir("reward")
    peft_model.save_pretrained(str(staged / "adapter"))
    hidden = model.get_input_embeddings().weight.shape[1]
    save_file({"weight": torch.randn(1, hidden) * 0.5, "bias": torch.zeros(1)}, str(staged / "score_head.safetensors"))
    entry = reg.register("reward", staged, parents=[sft.ref],
                         config={"reward_kind": "adapter", "base_model": sft.ref, "load_in_4bit": False},
                         metrics={"reward_mean": 0.0, "reward_std": 1.0, "eval_accuracy": 0.5})
    return entry.ref


@pytest.fixture(scope="session")
def rlhf_registry(tmp_path_factory, pretrained_registry, tiny_data) -> Path:
    """pretrain + a tiny sft + a fake adapter reward entry; copy it before adding entries."""
    import shutil

    reg = tmp_path_factory.mktemp("rlhf") / "runs"
    shutil.copytree(pretrained_registry, reg)
    res = run_script("stages/01_sft.py", "--registry", str(reg), "--data", str(tiny_data["sft"]),
                     "--eval_data", str(tiny_data["sft_eval"]), "--max_steps", "2", "--gen_eval_samples", "0",
                     "--learning_rate", "1e-3")
    assert res.returncode == 0, res.stderr[-3000:]
    register_fake_reward(reg)
    return reg


def load_script(path: str | Path, *, reuse: bool = False):
    """Import a script file as a module: `stages/03_ppo.py` or `scripts/chat.py` (relative to the repo root, or
    absolute) is not an importable module name, so tests and workers load the file itself.

    The module is registered in `sys.modules` (dataclasses and `typing.get_type_hints` resolve annotations
    through it) under a name made from the path, `script_stages_03_ppo`. Each call executes the file afresh,
    so a test never sees what another one did to the module; `reuse=True` returns the module already loaded
    from that file, if any (for callers that load the same script many times).
    """
    import importlib.util
    import re

    path = Path(path)
    path = path if path.is_absolute() else ROOT / path
    try:
        label = path.resolve().relative_to(ROOT).with_suffix("").as_posix()
    except ValueError:  # a script outside the repository
        label = path.resolve().with_suffix("").as_posix()
    name = "script_" + re.sub(r"\W", "_", label).strip("_")
    if reuse and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_stage(filename: str):
    """A stage script as a module: `load_stage("03_ppo.py")` is `load_script("stages/03_ppo.py")`."""
    return load_script(ROOT / "stages" / filename)
