"""Safe defaults (issue 8): safetensors only, `torch.load(weights_only=True)`, no remote code unless asked,
no token in what a run writes.

The runs inspected are the interrupted-then-resumed sft, reward and PPO runs of conftest.py (a tiny
pipeline on the `pretrained_registry` fixture), all started with HF_TOKEN=hf_secret_for_test.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from conftest import ROOT, load_stage
from reliability.conftest import SECRET, Interrupted, leftovers, listing
from rlhf.config import StageConfig

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
SOURCE_DIRS = ("rlhf", "stages", "scripts")
# The documented exceptions (rlhf/safety.py's module docstring, "Loading"): detoxify's released checkpoints
# are Lightning pickles, loaded as detoxify itself loads them, and only from a path the user named or from
# the torch hub cache.
WEIGHTS_ONLY_EXCEPTIONS = {("rlhf/safety.py", "_load_detoxify"), ("scripts/fetch_assets.py", "fetch_detoxify")}
RUN_FIXTURES = ("sft_killed_and_resumed", "reward_killed_and_resumed", "ppo_interrupted_and_resumed")


@pytest.fixture(scope="module")
def runs(request) -> dict[str, Interrupted]:
    return {name: request.getfixturevalue(name) for name in RUN_FIXTURES}


def _source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def _calls(path: Path) -> list[tuple[ast.Call, str]]:
    """(call, name of the innermost function around it, or '<module>') for every call in a file."""
    found: list[tuple[ast.Call, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        elif isinstance(node, ast.Call):
            found.append((node, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(), filename=str(path)), "<module>")
    return found


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


@pytest.mark.slow
def test_registered_artifacts_are_safetensors_only(runs, pretrained_registry):
    for registry in [pretrained_registry, *(run.registry for run in runs.values())]:
        for row in listing(registry):
            files = set(row["manifest"])
            pickled = sorted(f for f in files if Path(f).suffix in PICKLE_SUFFIXES)
            assert not pickled, f"{row['stage']}:{row['id']} holds pickle files {pickled}"
            assert any(f.endswith(".safetensors") for f in files), f"{row['stage']}:{row['id']} has no safetensors"
        # Trainer checkpoints (optimizer.pt, training_args.bin, ...) are allowed in .work/ while a run is
        # in progress, and go once it is registered.
        assert leftovers(registry) == []


def test_every_torch_load_is_weights_only():
    """Every `torch.load(` / `load_state_dict_from_url(` in rlhf/, stages/, scripts/ passes weights_only=True,
    but the documented detoxify loaders."""
    found, unsafe = 0, []
    for path in _source_files():
        rel = path.relative_to(ROOT).as_posix()
        for call, function in _calls(path):
            name = ast.unparse(call.func)
            if name not in ("torch.load", "torch.hub.load_state_dict_from_url"):
                continue
            found += 1
            if _keyword(call, "weights_only") is not True and (rel, function) not in WEIGHTS_ONLY_EXCEPTIONS:
                unsafe.append(f"{rel}:{call.lineno} in {function}(): {ast.unparse(call)}")
    assert found, "the scan found no torch.load at all: is it looking in the right place?"
    assert not unsafe, "torch.load without weights_only=True:\n" + "\n".join(unsafe)
    for rel, function in WEIGHTS_ONLY_EXCEPTIONS:  # each exception is still there and says why
        assert f"def {function}(" in (ROOT / rel).read_text(), f"stale exception {rel}:{function}"


def _stage_config(filename: str) -> type:
    module = load_stage(filename)
    (cls,) = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, StageConfig)
              and c is not StageConfig and c.__module__ == module.__name__]
    return cls


@pytest.mark.parametrize("filename", sorted(p.name for p in (ROOT / "stages").glob("[0-9][0-9]_*.py")))
def test_trust_remote_code_defaults_to_false(filename):
    fields = {f.name: f for f in dataclasses.fields(_stage_config(filename))}
    assert "trust_remote_code" in fields and fields["trust_remote_code"].default is False


def test_no_code_turns_trust_remote_code_on_by_itself():
    literal = [f"{p.relative_to(ROOT)}:{call.lineno}" for p in _source_files() for call, _ in _calls(p)
               if _keyword(call, "trust_remote_code") is True]
    assert not literal, f"trust_remote_code=True hard-coded at {literal}"


@pytest.mark.slow
def test_hf_token_never_reaches_the_registry_configs_metrics_or_logs(runs):
    secret = SECRET.encode()
    for name, run in runs.items():
        for res in (run.first, run.second):
            assert SECRET not in res.stdout + res.stderr, f"{name}: the token is in the run's log"
        files = [p for p in run.registry.rglob("*") if p.is_file()]  # registry.db, configs, metrics, tensorboard
        assert any(p.name == "registry.db" for p in files)
        leaked = [str(p.relative_to(run.registry)) for p in files if secret in p.read_bytes()]
        assert not leaked, f"{name}: the token is in {leaked}"
