"""The comparison report (stage 04): metrics.json, samples.jsonl, report.md, report.html, PNG plots.

`write_report(result, samples, out_dir, training_logs=...)` writes, into `out_dir`:

    metrics.json         `result` as is (NaN written as null)
    samples.jsonl        one line per prompt: category, messages, every model's K samples with reward/toxicity
    report.md            a title line, a blank line, the headline table (scripts/run_pipeline.py prints
                         `text.split("\\n\\n")[1]`), then settings, differences vs base with CIs, models, plots
    report.html          self-contained (inline CSS, plots as base64 PNG): the tables, the plots, then the
                         first sample of every model side by side per prompt, adversarial prompts first
    training_curves.png  stage-03 score, toxicity, KL and KL coefficient per step, one line per RL run (when a
                         training log exists)
    reward_toxicity.png  per model: reward and toxicity rate (all / adversarial prompts) with CI error bars
    frontier_reward.png, frontier_toxicity.png
                         the reward–KL frontier: RM score and the held-out judge's toxicity rate against KL to
                         SFT and to base, one curve per RL run through its snapshots (starting at SFT), the other
                         models as single points

report.md's sections after the headline: settings (which scorer grades toxicity, and whether it is the reward's
own), differences vs base, the win-rate matrix, the paired differences that answer a question, the frontier's
points, each RL run's flags, models, notes, plots.

matplotlib is imported inside the plotting functions (Agg backend, no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

# (metric key, column header, format) of the headline table, in order.
HEADLINE = (
    ("reward_mean", "reward", "{:+.3f}"),
    ("win_rate", "win rate vs base [95% CI]", None),
    ("adversarial/toxicity_rate", "toxicity rate (adversarial)", "{:.3f}"),
    ("toxicity_rate", "toxicity rate", "{:.3f}"),
    ("expected_max_toxicity", "exp. max toxicity", "{:.3f}"),
    ("toxicity_probability", "toxicity prob.", "{:.3f}"),
    ("reward_toxicity_rate", "toxicity rate (reward's scorer)", "{:.3f}"),
    ("kl_to_sft", "KL to SFT", "{:.2f}"),
    ("kl_to_base", "KL to base", "{:.2f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.3f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("length_mean", "length", "{:.1f}"),
    ("eos_rate", "EOS rate", "{:.2f}"),
)
FRONTIER_PLOTS = (("reward_mean", "frontier_reward.png", "RM score (normalized, the proxy)"),
                  ("toxicity_rate", "frontier_toxicity.png", "toxicity rate (held-out judge)"))
CURVES = (("objective/score", "RM score (normalized)"), ("objective/toxicity", "toxicity"),
          ("objective/kl", "KL to reference (nats / response)"), ("objective/kl_coef", "KL coefficient β"))


def write_report(result: dict[str, Any], samples: list[dict], out_dir: Path,
                 training_logs: dict[str, Path] | None = None) -> dict[str, Path]:
    """Write every report file (see the module docstring); return {file name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"metrics.json": out_dir / "metrics.json", "samples.jsonl": out_dir / "samples.jsonl"}
    files["metrics.json"].write_text(json.dumps(json_safe(result), indent=2, sort_keys=False) + "\n")
    files["samples.jsonl"].write_text("".join(json.dumps(json_safe(s)) + "\n" for s in samples))
    plots: dict[str, Path] = {}
    if training_logs and plot_training_curves(training_logs, out_dir / "training_curves.png"):
        plots["RL training curves"] = out_dir / "training_curves.png"
    plot_reward_toxicity(result, out_dir / "reward_toxicity.png")
    plots["Reward and toxicity rate per model (95% CI)"] = out_dir / "reward_toxicity.png"
    for key, name, title in FRONTIER_PLOTS:
        plot_frontier(result, key, title, out_dir / name)
        plots[f"Reward–KL frontier: {title}"] = out_dir / name
    files.update({p.name: p for p in plots.values()})
    files["report.md"] = out_dir / "report.md"
    files["report.md"].write_text(markdown_report(result, plots))
    files["report.html"] = out_dir / "report.html"
    files["report.html"].write_text(html_report(result, samples, plots))
    return files


def json_safe(value: Any) -> Any:
    """`value` with NaN / inf floats as None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


def _with_ci(value: Any, ci: dict | None, fmt: str = "{:.3f}") -> str:
    if ci is None:
        return _fmt(value, fmt)
    return f"{_fmt(value, fmt)} [{_fmt(ci['low'], fmt)}, {_fmt(ci['high'], fmt)}]"


def headline_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the headline table: one row per model."""
    header = ["model", *(h for _, h, _ in HEADLINE)]
    rows = []
    for label, metrics in result["models"].items():
        row = [label]
        for key, _, fmt in HEADLINE:
            if key == "win_rate":
                ci = result["ci"].get(f"{label}_vs_base", {}).get("win_rate")
                row.append("–" if label == "base" else _with_ci(metrics.get("win_rate"), ci))
            else:
                row.append(_fmt(metrics.get(key), fmt))
        rows.append(row)
    return header, rows


def delta_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per metric compared with base, one "value [low, high]" column per model."""
    comparisons = [k for k in result["ci"] if k.endswith("_vs_base")]
    metrics: list[str] = []
    for c in comparisons:
        metrics += [m for m in result["ci"][c] if m not in metrics]
    rows = []
    for metric in metrics:
        fmt = "{:+.3f}" if metric.startswith("delta/") else "{:.3f}"
        rows.append([metric, *(_with_ci(result["ci"][c][metric]["value"], result["ci"][c][metric], fmt)
                               if metric in result["ci"][c] else "n/a" for c in comparisons)])
    return ["metric", *(c.replace("_vs_", " vs ") for c in comparisons)], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _settings_line(result: dict[str, Any]) -> str:
    s = result["settings"]
    return (f"{result['prompts']} held-out prompts ({result['adversarial_prompts']} adversarial) × "
            f"{result['samples_per_prompt']} samples per model, temperature {s['temperature']}, top_p {s['top_p']}, "
            f"max_new_tokens {s['max_new_tokens']}, seed {s['seed']}; reward model {result['reward_model']} "
            f"(normalized as in PPO); {scorers_sentence(result)} "
            f"Perplexity / BLEU / ROUGE-L on {result['eval_dialogues']} held-out dialogues ({s['eval_data']}).")


def scorers_sentence(result: dict[str, Any]) -> str:
    """Which scorer grades the toxicity columns, which one the reward used, and, plainly, whether they are one."""
    judge, reward = result["scorers"]["eval"], result["scorers"]["reward"]
    threshold = result["settings"]["threshold"]
    text = (f"toxicity columns by the held-out judge {judge} (toxic: score ≥ {threshold}), "
            f"`toxicity rate (reward's scorer)` by {reward}, the RL reward's toxicity scorer.")
    if judge == reward:
        text += (f" The held-out judge and the reward's scorer are the same scorer ({judge}): a policy that learned "
                 "that scorer's blind spots looks safer here than it is.")
    return text


def matrix_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): RM-judged win rate of the row's model over the column's (paired samples, ties half)."""
    labels = list(result.get("win_matrix", {}))
    rows = [[a, *("–" if a == b else _fmt(result["win_matrix"][a].get(b)) for b in labels)] for a in labels]
    return ["row beats column", *labels], rows


def differences_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per paired difference a − b with its CI."""
    rows = [[d["question"], f"{d['a']} − {d['b']}", d["metric"],
             f"{_fmt(d['delta'], '{:+.3f}')} [{_fmt(d['ci_low'], '{:+.3f}')}, {_fmt(d['ci_high'], '{:+.3f}')}]"]
            for d in result.get("differences", [])]
    return ["question", "a − b", "metric", "delta [CI]"], rows


def frontier_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every frontier point, runs first (one row per snapshot), then the other models."""
    cells = (lambda p: [_fmt(p["kl_to_sft"], "{:.2f}"), _fmt(p["kl_to_base"], "{:.2f}"),
                        _fmt(p["reward_mean"], "{:+.3f}"), _fmt(p["toxicity_rate"])])
    rows = [[label, str(p["step"]), *cells(p)] for label, points in result.get("frontier", {}).items() for p in points]
    rows += [[label, "–", *cells(p)] for label, p in result.get("frontier_references", {}).items()]
    return ["model", "step", "KL to SFT", "KL to base", "reward", "toxicity rate (judge)"], rows


def frontier_sentence(result: dict[str, Any]) -> str:
    fs = result["frontier_settings"]
    return (f"Each RL run's policy snapshots (at most {fs['max_snapshots']} per run, evenly spread over its "
            f"checkpoints), sampled on the first {fs['prompts']} held-out prompts × {fs['samples_per_prompt']} "
            f"samples: fewer than the table's {result['prompts']} × {result['samples_per_prompt']}, with the same "
            "settings and seed. The other models are the same rows of their own samples. KL is the mean over "
            "samples of Σ_t [log π − log π_ref] (nats per response).")


def flag_lines(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(run, flag) for every RL run's flags; (run, "none") for a run without any."""
    return [(label, f) for label, fl in result.get("flags", {}).items() for f in (fl or ["none"])]


def markdown_report(result: dict[str, Any], plots: dict[str, Path]) -> str:
    labels = list(result["models"])
    header, rows = headline_rows(result)
    ci = result["ci"]
    ci_words = f"{ci['confidence']:.0%} bootstrap CI over prompts, {ci['resamples']} resamples"
    parts = [
        f"# Aligned vs base: {', '.join(labels)} on {result['prompts']} held-out prompts",
        _md_table(header, rows),
        _settings_line(result),
        f"## Differences vs base ({ci_words})\n\n"
        "`delta/x` is model − base on the same prompts and sample indices; `win_rate` is the RM-judged share "
        "of paired samples where the model beats base (ties count half).\n\n"
        + _md_table(*delta_table(result)),
        "## Win rates, every model vs every other\n\nRM-judged share of paired samples (same prompt, same sample "
        "index) where the row's model beats the column's; ties count half.\n\n" + _md_table(*matrix_table(result)),
        f"## What each step bought: paired differences ({ci_words})\n\n"
        "delta = a − b over the same prompts and sample indices; toxicity_rate by the held-out judge, "
        "reward_toxicity_rate by the reward's scorer.\n\n" + _md_table(*differences_table(result)),
        "## Reward–KL frontier\n\n" + frontier_sentence(result) + "\n\n" + _md_table(*frontier_table(result)),
        "## Flags per RL run\n\nStage 03's training flags, then the frontier's: proxy reward up while the held-out "
        "judge's toxicity rate goes up by more than sampling noise (one-sided 95%) between consecutive checkpoints "
        "(SFT as step 0).\n\n"
        + ("\n".join(f"- {label}: {f}" for label, f in flag_lines(result)) or "- no RL run compared"),
        "## Models\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in result["refs"].items()),
    ]
    notes = [f"- {label}: {n}" for label, ns in result.get("notes", {}).items() for n in ns]
    notes += [f"- {n}" for n in result.get("remarks", [])]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(notes))
    if plots:
        parts.append("## Plots\n\n" + "\n\n".join(f"![{title}]({p.name})" for title, p in plots.items()))
    parts.append("Side-by-side samples: report.html; every sample with its reward and toxicity: samples.jsonl.")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------- plots


def plot_training_curves(metrics_jsonl: dict[str, Path], out_png: Path) -> bool:
    """Score, toxicity, KL and KL coefficient per step, one line per run ({label: its metrics.jsonl}); False when
    no run has a log."""
    logs = {}
    for label, path in metrics_jsonl.items():
        if Path(path).is_file():
            rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
            if rows:
                logs[label] = rows
    if not logs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (key, title) in zip(axes.flat, CURVES):
        drawn = False
        for label, rows in logs.items():
            points = [(r.get("step", i + 1), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("RL training (each run's metrics.jsonl)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def plot_reward_toxicity(result: dict[str, Any], out_png: Path) -> None:
    """Bars per model: reward, toxicity rate and adversarial toxicity rate, each with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["models"])
    keys = [("reward_mean", "reward (normalized)"), ("toxicity_rate", "toxicity rate (held-out judge)"),
            ("adversarial/toxicity_rate", "toxicity rate, adversarial prompts"),
            ("reward_toxicity_rate", "toxicity rate (reward's scorer)")]
    keys = [k for k in keys if any(k[0] in result["ci"]["models"].get(label, {}) for label in labels)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes if len(keys) > 1 else [axes], keys):
        values, errs = [], [[], []]
        for label in labels:
            ci = result["ci"]["models"].get(label, {}).get(key)
            v = ci["value"] if ci else math.nan
            values.append(v)
            errs[0].append(max(0.0, v - ci["low"]) if ci else 0.0)
            errs[1].append(max(0.0, ci["high"] - v) if ci else 0.0)
        ax.bar(labels, values, yerr=errs, capsize=6, color=[colors[i % len(colors)] for i in range(len(labels))])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    conf = result["ci"].get("confidence", 0.95)
    fig.suptitle(f"Per model, {conf:.0%} bootstrap CI over prompts")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_frontier(result: dict[str, Any], key: str, title: str, out_png: Path) -> None:
    """`key` (reward_mean or toxicity_rate) against KL to SFT (left) and to base (right): one curve per RL run
    through its snapshots, starting at the SFT model's point, and the other models as single points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result.get("frontier", {})
    refs = result.get("frontier_references", {})
    start = [refs["sft"]] if "sft" in refs else []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (x, xlabel) in zip(axes, (("kl_to_sft", "KL to SFT (nats / response)"),
                                      ("kl_to_base", "KL to base (nats / response)"))):
        for i, (label, points) in enumerate(runs.items()):
            if points:
                chain = start + points
                ax.plot([p[x] for p in chain], [p[key] for p in chain], marker="o", color=colors[i % len(colors)],
                        label=label)
                for p in points:
                    ax.annotate(str(p["step"]), (p[x], p[key]), textcoords="offset points", xytext=(3, 3), fontsize=7)
        for label, p in refs.items():
            ax.scatter([p[x]], [p[key]], marker="s", color="black", zorder=3)
            ax.annotate(label, (p[x], p[key]), textcoords="offset points", xytext=(4, -10), fontsize=8)
        if not any(runs.values()):
            ax.text(0.5, 0.9, "no RL run with policy snapshots", ha="center", transform=ax.transAxes, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(title)
    if any(runs.values()):
        axes[0].legend(fontsize=8)
    fs = result.get("frontier_settings", {})
    fig.suptitle(f"Reward–KL frontier: {title} (snapshot steps annotated; {fs.get('prompts')} prompts × "
                 f"{fs.get('samples_per_prompt')} samples)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
p.settings { color: #444; max-width: 1100px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #d0d0d5; padding: 4px 8px; vertical-align: top; }
th { background: #f2f2f5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.samples { table-layout: fixed; width: 100%; }
table.samples td { white-space: pre-wrap; word-wrap: break-word; }
td.toxic { background: #fde2e2; }
.tag { display: inline-block; font-size: 11px; padding: 1px 6px; border-radius: 8px; background: #e8e8ee; }
.tag.adversarial { background: #f9d2a8; }
.meta { display: block; font-size: 11px; color: #666; margin-top: 4px; }
.turn { display: block; } .role { font-weight: 600; color: #555; }
img { max-width: 100%; border: 1px solid #e0e0e5; margin: 6px 0; }
"""


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' if i >= numeric_from else f"<td>{html.escape(c)}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _samples_table(samples: list[dict], labels: list[str], threshold: float) -> str:
    order = sorted(range(len(samples)), key=lambda i: samples[i].get("category") != "adversarial")  # stable
    head = '<th style="width:22%">prompt</th>' + "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for i in order:
        s = samples[i]
        category = s.get("category", "normal")
        turns = "".join(f'<span class="turn"><span class="role">{html.escape(m["role"])}:</span> '
                        f'{html.escape(m["content"])}</span>' for m in s["messages"])
        cells = [f'<td><span class="tag {html.escape(category)}">{html.escape(category)}</span> #{i}{turns}</td>']
        for label in labels:
            reply = s["replies"][label][0]
            toxic = reply["toxicity"] >= threshold
            meta = (f'reward {reply["reward"]:+.2f} · toxicity {reply["toxicity"]:.2f}'
                    f'{"" if reply["eos"] else " · no EOS"}')
            text = html.escape(reply["text"]) or "<i>(empty)</i>"
            cells.append(f'<td class="{"toxic" if toxic else ""}">{text}<span class="meta">{meta}</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="samples"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def html_report(result: dict[str, Any], samples: list[dict], plots: dict[str, Path]) -> str:
    labels = list(result["models"])
    header, rows = headline_rows(result)
    ci = result["ci"]
    threshold = result["settings"]["threshold"]
    title = f"Aligned vs base: {', '.join(labels)} on {result['prompts']} held-out prompts"
    refs = "".join(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in result["refs"].items())
    notes = "".join(f"<li>{html.escape(label)}: {html.escape(n)}</li>"
                    for label, ns in result.get("notes", {}).items() for n in ns)
    notes += "".join(f"<li>{html.escape(n)}</li>" for n in result.get("remarks", []))
    parts = [
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table(header, rows),
        f'<p class="settings">{html.escape(_settings_line(result))}</p>',
        f"<h2>Differences vs base ({ci['confidence']:.0%} bootstrap CI over prompts, {ci['resamples']} resamples)</h2>",
        "<p>delta/x: model − base on the same prompts and sample indices; win_rate: RM-judged share of paired "
        "samples where the model beats base (ties count half).</p>",
        _html_table(*delta_table(result)),
        "<h2>Win rates, every model vs every other</h2><p>RM-judged share of paired samples where the row's model "
        "beats the column's; ties count half.</p>",
        _html_table(*matrix_table(result)),
        f"<h2>What each step bought: paired differences ({ci['confidence']:.0%} bootstrap CI over prompts)</h2>"
        "<p>delta = a − b over the same prompts and sample indices; toxicity_rate by the held-out judge, "
        "reward_toxicity_rate by the reward's scorer.</p>",
        _html_table(*differences_table(result), numeric_from=3),
        f"<h2>Reward–KL frontier</h2><p>{html.escape(frontier_sentence(result))}</p>",
        _html_table(*frontier_table(result), numeric_from=2),
        "<h2>Flags per RL run</h2><ul>" + "".join(f"<li>{html.escape(label)}: {html.escape(f)}</li>"
                                                  for label, f in flag_lines(result)) + "</ul>",
        f"<h2>Models</h2><ul>{refs}</ul>",
    ]
    if notes:
        parts.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    for plot_title, path in plots.items():
        parts.append(f"<h2>{html.escape(plot_title)}</h2>{_img_tag(path, plot_title)}")
    parts.append(f"<h2>Samples (first of {result['samples_per_prompt']} per prompt; adversarial prompts first; "
                 f"red: toxicity ≥ {threshold})</h2>")
    parts.append(_samples_table(samples, labels, threshold))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
