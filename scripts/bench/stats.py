"""The numbers of a report, from run records: medians of time and memory, seed means of quality, ratios
ours / TRL and log-log slopes. Pure functions, worked by hand in tests/test_bench_plumbing.py.

A run record is what `bench.runs` returns: per-step series (`step_s`, `score`, `kl`, ...) plus the
child's totals (`loop_s`, `episodes`, `wall_s`, `peak_rss_mb`, ...); a failed run has `ok` False.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

# Time and memory figures: medians over the runs (robust to one run slowed by the shared machine).
COST = ("loop_s_per_episode", "steady_s_per_episode", "process_s_per_episode", "peak_rss_mb",
        "peak_rss_above_baseline_mb")
# Quality figures: means over the seeds, with their standard errors.
QUALITY = ("score_last_quarter", "score_gain", "score_gain_within_run", "kl_last_quarter")


def median(xs: list[float | None]) -> float | None:
    """Median of the values present (a failed run's None is left out); None when there are none."""
    present = [x for x in xs if x is not None]
    return statistics.median(present) if present else None


def mean(xs: list[float | None]) -> float | None:
    """Mean of the values present; None when there are none."""
    present = [x for x in xs if x is not None]
    return sum(present) / len(present) if present else None


def standard_error(xs: list[float | None]) -> float | None:
    """Standard error of the mean of the values present (None with < 2 values)."""
    present = [x for x in xs if x is not None]
    return statistics.stdev(present) / math.sqrt(len(present)) if len(present) > 1 else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def loglog_slope(xs: list[float], ys: list[float | None]) -> float | None:
    """Least-squares slope k of log y = k·log x + c: cost grows like x^k (None with < 2 points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def quarter_means(xs: list[float]) -> tuple[float | None, float | None]:
    """Means of the first and last quarter of a per-step series (at least one step each)."""
    if not xs:
        return None, None
    k = max(1, len(xs) // 4)
    return mean(xs[:k]), mean(xs[-k:])


def summarize_run(run: dict[str, Any], batch_size: int, start_score: float | None = None) -> dict[str, float | None]:
    """Per-episode figures of one run record (docs/BENCHMARKS.md says what each means).

    `start_score`: the SFT policy's mean score on the training prompts (`bench.setups.sft_start_score`), the
    common start that `score_gain` is measured from; `score_gain_within_run` is last minus first quarter."""
    steps = run.get("step_s") or []
    first, last = quarter_means(run.get("score") or [])
    _, kl_last = quarter_means(run.get("kl") or [])
    episodes = run.get("episodes") or 0
    return {
        "loop_s_per_episode": ratio(run.get("loop_s"), episodes),
        # The first step pays one-off costs (lazy initialization, the first allocations).
        "steady_s_per_episode": ratio(median(steps[1:]) if len(steps) > 1 else median(steps), batch_size),
        "process_s_per_episode": ratio(run.get("wall_s"), episodes),
        "peak_rss_mb": run.get("peak_rss_mb"),
        "peak_rss_above_baseline_mb": run.get("peak_rss_above_baseline_mb"),
        "score_last_quarter": last,
        "score_gain": last - start_score if last is not None and start_score is not None else None,
        "score_gain_within_run": last - first if first is not None and last is not None else None,
        "kl_last_quarter": kl_last,
    }


def compare(runs: list[dict[str, Any]], batch_size: int, start_score: float | None = None) -> dict[str, Any]:
    """Medians (time, memory) and seed means ± standard errors (quality) per implementation, and the
    ratios ours / TRL."""
    out: dict[str, Any] = {}
    for impl in ("ours", "trl"):
        ok = [summarize_run(r, batch_size, start_score) for r in runs if r["impl"] == impl and r.get("ok")]
        fig: dict[str, Any] = {k: median([s[k] for s in ok]) for k in COST}
        fig.update({k: mean([s[k] for s in ok]) for k in QUALITY})
        fig.update({f"{k}_se": standard_error([s[k] for s in ok]) for k in QUALITY})
        fig["start_score"] = start_score
        fig["runs_ok"] = len(ok)
        fig["errors"] = sorted({r["error"] for r in runs if r["impl"] == impl and not r.get("ok")})
        out[impl] = fig
    for k in COST:
        out[f"ratio_{k}"] = ratio(out["ours"][k], out["trl"][k])
    return out


def headline(report: dict[str, Any]) -> dict[str, float | None]:
    """The ratios at the top of the JSON: PPO configuration (b) on the tiny model and on the GPT-2-small-shaped one
    where the weights dominate the memory, and GRPO / RLOO against TRL 1.16 on the GPT-2-small shape."""
    b = report.get("configs", {}).get("b", {})
    g = report.get("gpt2_small", {}).get("b", {})
    cf = report.get("critic_free", {}).get("gpt2_small", {})
    out = {"wall_ratio_ours_over_trl": b.get("ratio_loop_s_per_episode"),
           "peak_rss_ratio_ours_over_trl": b.get("ratio_peak_rss_mb"),
           "gpt2_small_wall_ratio_ours_over_trl": g.get("ratio_loop_s_per_episode"),
           "gpt2_small_peak_rss_ratio_ours_over_trl": g.get("ratio_peak_rss_mb")}
    for est in ("grpo", "rloo"):
        out[f"{est}_wall_ratio_ours_over_trl"] = cf.get(est, {}).get("ratio_loop_s_per_episode")
        out[f"{est}_peak_rss_ratio_ours_over_trl"] = cf.get(est, {}).get("ratio_peak_rss_mb")
    return out
