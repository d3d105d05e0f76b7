"""A report's outputs: the JSON file of every figure, and the markdown tables docs/BENCHMARKS.md shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .profiling import PROFILED
from .stats import COST

CONFIG_TITLES = {"a": "(a) full precision",
                 "b": "(b) 4-bit: ours one base vs TRL 4-bit policy + LoRA, full value/reward",
                 "b_lean": "(b_lean) ours (b) vs TRL 4-bit policy + LoRA, 4-bit value + LoRA, 4-bit reward"}
SCALING_AXES = (("response_length", "response_length (width 128)"), ("width", "n_embd (response_length 32)"))


def write(report: dict[str, Any], json_path: Path | None, markdown_path: Path | None) -> None:
    """Write the report as JSON and its tables as markdown, each where asked."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1, default=str))
    if markdown_path:
        markdown_path.write_text(markdown(report))


def _f(x: Any, digits: int = 3) -> str:
    """A figure for a table cell: `digits` significant digits, whole numbers from 100 up, "–" when missing."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"
    return str(x)


def _pm(fig: dict[str, Any], key: str) -> str:
    """A seed mean with its standard error."""
    se = fig.get(f"{key}_se")
    return _f(fig.get(key)) + (f" ± {se:.3f}" if se is not None else "")


def _compare_table(title: str, cmp: dict[str, Any], quality: bool, peer: str = "TRL 1.12") -> list[str]:
    """One comparison (`bench.stats.compare`): a row per implementation (TRL's named `peer`) and the row of
    ratios."""
    head = "| | loop s/episode | steady s/episode | process s/episode | peak RSS MiB | above baseline MiB |"
    qhead = " score (last quarter) | gain over the SFT policy | last − first quarter | KL (last quarter) | runs |"
    out = [f"**{title}**", "", head + (qhead if quality else " runs |"),
           "|---" * (len(COST) + (6 if quality else 2)) + "|"]
    for impl in ("ours", "trl"):
        f = cmp[impl]
        shown = peer if impl == "trl" else "ours"
        q = (f" {_pm(f, 'score_last_quarter')} | {_pm(f, 'score_gain')} | {_pm(f, 'score_gain_within_run')} | "
             f"{_f(f['kl_last_quarter'])} |") if quality else ""
        err = f" (failed: {'; '.join(f['errors'])})" if f["errors"] else ""
        out.append(f"| {shown} | " + " | ".join(_f(f[c]) for c in COST) + f" |{q} {f['runs_ok']}{err} |")
    out.append("| ours / TRL | " + " | ".join(_f(cmp[f"ratio_{c}"]) for c in COST) + " |"
               + (" | | | |" if quality else "") + " |")
    start = cmp["ours"].get("start_score")
    out.append(f"\nThe SFT policy's own mean score, where gains start: {_f(start)}.\n" if quality and start else "")
    return out


def _gpt2_tables(g: dict[str, Any]) -> list[str]:
    """The GPT-2-small part: its settings, then one comparison per configuration and variant."""
    shown = ("total_episodes", "batch_size", "num_ppo_epochs", "response_length")
    out = [f"GPT-2-small shape ({g['n_params'] / 1e6:.1f}M parameters, random weights), settings "
           + ", ".join(f"{k}={v}" for k, v in g["settings"].items() if k in shown) + ":", ""]
    for key, cmp in g.items():
        if isinstance(cmp, dict) and "ours" in cmp:
            out += _compare_table(f"GPT-2 small, configuration {key}", cmp, quality=False)
    return out


def _scaling_tables(sc: dict[str, Any]) -> list[str]:
    """Ours against response length and against width, with the log-log slopes."""
    out: list[str] = []
    for axis, label in SCALING_AXES:
        out += [f"**Scaling of ours vs {label}**", "",
                "| x | parameters | s/episode (steady) | episodes/s | peak RSS MiB | above baseline MiB "
                "| tokens/response |", "|---|---|---|---|---|---|---|"]
        for p in sc[axis]:
            figs = (p["steady_s_per_episode"], p["episodes_per_s"], p["peak_rss_mb"],
                    p["peak_rss_above_baseline_mb"], p["mean_response_tokens"])
            out.append(f"| {p['x']} | {p['n_params']} | " + " | ".join(_f(x) for x in figs) + " |")
        out.append(f"\nlog-log slope: time {_f(sc[f'{axis}_slope_time'], 2)}, "
                   f"last two points {_f(sc.get(f'{axis}_slope_time_last2'), 2)}; "
                   f"memory above baseline {_f(sc[f'{axis}_slope_rss_above_baseline'], 2)}"
                   + (f"; time vs parameters {_f(sc['width_slope_time_vs_params'], 2)}" if axis == "width" else "")
                   + "\n")
    return out


def _critic_free_tables(cf: dict[str, Any]) -> list[str]:
    """GRPO and RLOO beside TRL 1.16: the tiny model with quality, the GPT-2-small shape (cost), our profile."""
    shown = ("total_episodes", "batch_size", "num_generations", "num_mini_batches", "num_ppo_epochs",
             "response_length", "trl_as_shipped")
    out = []
    for model, title, quality in (("tiny", "tiny model", True), ("gpt2_small", "GPT-2-small shape", False)):
        settings = ", ".join(f"{k}={v}" for k, v in cf["settings"][model].items() if k in shown)
        out += [f"Critic-free, {title}: {settings}.", ""]
        for est, cmp in cf.get(model, {}).items():
            out += _compare_table(f"{est.upper()}, {title} (KL: {cf['kl_figures'][est]})", cmp, quality,
                                  peer="TRL 1.16")
    prof = cf.get("cprofile_gpt2_grpo")
    if prof:
        out += ["**Where our time goes** (GRPO, GPT-2-small shape, cProfile)", "", "| part | s | share |",
                "|---|---|---|"]
        out += [f"| {name} | {_f(prof['seconds'][name])} | {_f(prof['share_of_loop'][name], 2)} |"
                for name in PROFILED]
        out.append("")
    return out


def _profile_table(prof: dict[str, Any]) -> list[str]:
    """The timing fields of our (b) runs, and the PROFILED parts of each profiled run."""
    t = prof["timing_fields_b"]
    out = [f"**Where our time goes** (configuration b): timing fields rollout {_f(t['rollout_s'])} s, "
           f"update {_f(t['update_s'])} s, rollout share {_f(t['rollout_share'], 2)}", ""]
    runs = [(k, prof[key]) for k, key in (("tiny model", "cprofile"), ("GPT-2 small", "cprofile_gpt2"))
            if prof.get(key)]
    out.append("| part | " + " | ".join(f"{k} s | {k} share" for k, _ in runs) + " |")
    out.append("|---" * (1 + 2 * len(runs)) + "|")
    for name in PROFILED:
        out.append(f"| {name} | " + " | ".join(f"{_f(v['seconds'][name])} | {_f(v['share_of_loop'][name], 2)}"
                                               for _, v in runs) + " |")
    out.append("")
    return out


def markdown(report: dict[str, Any]) -> str:
    """The tables of docs/BENCHMARKS.md from a report (the parts it holds)."""
    out = [f"Mode {report['mode']}, threads {report['threads']}, load before {_f(report['load_before'][0], 2)} "
           f"/ after {_f(report.get('load_after', [None])[0], 2)}, {report.get('elapsed_s', 0) / 60:.1f} min.", ""]
    for cfg, title in CONFIG_TITLES.items():
        if cfg in report.get("configs", {}):
            out += _compare_table(title, report["configs"][cfg], quality=True)
    if report.get("gpt2_small"):
        out += _gpt2_tables(report["gpt2_small"])
    if report.get("scaling"):
        out += _scaling_tables(report["scaling"])
    if report.get("profile"):
        out += _profile_table(report["profile"])
    if report.get("critic_free"):
        out += _critic_free_tables(report["critic_free"])
    return "\n".join(out)
