"""Where a report was measured: the machine, its load, the commit and library versions, and the TRL 1.12
virtualenv that the peer (scripts/bench_trl_peer.py) runs in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from .harness import ROOT

PEER_TRL = "trl==1.12.0"
# Pinned in the peer's virtualenv to the versions this interpreter has, so only TRL differs.
PINNED = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers", "safetensors",
          "huggingface_hub", "numpy")


def machine() -> dict[str, Any]:
    """Cores, memory, CPU model and Python version of this machine."""
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    mem = next((int(x.split()[1]) / 2**20 for x in Path("/proc/meminfo").read_text().splitlines()
                if x.startswith("MemTotal")), None)
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None, "cpu": cpu, "gpu": False,
            "python": platform.python_version()}


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages: the machine is shared, and the times depend on it."""
    return list(os.getloadavg())


def git_commit() -> str | None:
    """The commit of the code measured (None outside a git checkout)."""
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() or None


def our_versions() -> dict[str, str]:
    """Versions of torch, trl and the pinned libraries in this interpreter."""
    return {n: metadata.version(n) for n in ("torch", "trl", *PINNED)}


def ensure_peer(venv: Path) -> dict[str, str]:
    """Create or refresh the peer's virtualenv with trl==1.12.0 and our library versions; return its versions.

    The pins are stamped in `venv/.bench-pins`; a virtualenv whose stamp matches is reused as it is."""
    py = venv / "bin" / "python"
    torch_pin = f"torch=={metadata.version('torch').split('+')[0]}"
    pins = [PEER_TRL, *(f"{n}=={metadata.version(n)}" for n in PINNED)]
    stamp = venv / ".bench-pins"
    wanted = "\n".join([torch_pin, *pins])
    if not (py.exists() and stamp.exists() and stamp.read_text() == wanted):
        if not py.exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, torch_pin], check=True)
        subprocess.run([*pip, *pins], check=True)
        stamp.write_text(wanted)
    names = ["torch", "trl", *PINNED]
    code = f"import json, importlib.metadata as m; print(json.dumps({{n: m.version(n) for n in {names!r}}}))"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)
