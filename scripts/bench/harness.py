"""Child processes and what is measured of them: each run in its own interpreter, its wall time and its own
peak RSS (`ru_maxrss` from `os.wait4`), its output in a log file, killed past a time limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository: every child runs from here

# A fresh, small interpreter starts each measured child and reads its rusage: ru_maxrss counts the
# memory image a process was forked from, and the benchmark's own (models built in the setup) is large.
MEASURE = ("import json, os, subprocess, sys, time; t = time.time(); p = subprocess.Popen(sys.argv[2:]); "
           "_, status, ru = os.wait4(p.pid, 0); json.dump({'rc': os.waitstatus_to_exitcode(status), "
           "'maxrss_kb': ru.ru_maxrss, 'wall_s': time.time() - t}, open(sys.argv[1], 'w'))")


def run_child(cmd: list[str], env: dict[str, str], timeout: float, log_path: Path) -> dict[str, Any]:
    """Run one child; wall time and its own peak RSS (ru_maxrss, MiB). Output goes to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_suffix(".rusage.json")
    usage_path.unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-S", "-c", MEASURE, str(usage_path), *cmd], cwd=ROOT,
                                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the wrapper and the run it started (their own session)
            proc.wait()
    killed = {"rc": -9, "maxrss_kb": 0, "wall_s": timeout}
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else killed
    tail = log_path.read_text(errors="replace")[-3000:]
    return {"rc": usage["rc"], "wall_s": usage["wall_s"], "peak_rss_mb": usage["maxrss_kb"] / 1024,
            "log": str(log_path), "log_tail": tail if usage["rc"] else ""}


def child_env(threads: int) -> dict[str, str]:
    """The environment of every child: `threads` OpenMP/MKL threads (OpenMP threads spin against other
    processes on a shared machine: docs/BENCHMARKS.md), offline hubs, quiet tokenizers and TRL."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}


def last_error_line(text: str) -> str:
    """The last unindented line of a child's output: a traceback's exception line."""
    lines = [x for x in text.strip().splitlines() if x.strip() and not x.startswith(" ")]
    return lines[-1][:500] if lines else "no output"


def baseline(py: str, code: list[str], label: str, threads: int, work: Path) -> dict[str, Any]:
    """A child of interpreter `py` that only imports what a run imports: the peak RSS every run starts from."""
    res = run_child([py, *code], child_env(threads), 600, work / "logs" / f"baseline-{label}.log")
    return {"label": label, **res}
