"""Benchmark our PPO (stages/03_ppo.py) side by side with TRL 1.12's PPOTrainer, and how our cost grows.

    .venv/bin/python scripts/bench_ppo.py --quick --json .bench/quick.json    # < 15 min on 2 cores
    .venv/bin/python scripts/bench_ppo.py --json .bench/full.json             # the full run
    .venv/bin/python scripts/bench_ppo.py --quick --skip-peer                 # ours only, no TRL venv

Steps (docs/BENCHMARKS.md shows the results and explains every figure):

0. The peer: its own virtualenv `.bench/trl112/` (git-ignored) with torch, trl==1.12.0 and the
   transformers/peft/bitsandbytes/accelerate/datasets versions of ours, pinned with `==` to what
   this interpreter has. It runs `scripts/bench_trl_peer.py`; no TRL code is copied here.
1. The shared setup, built once in `.bench/work/` (kept; `--rebuild-setup` redoes it): demo data;
   a tiny GPT-2-style model through our stage CLIs (pretrain -> sft -> a LoRA reward model).
   The reward model's head is divided by its held-out std; it is registered twice with
   reward_mean 0 / reward_std 1: as an adapter on the SFT base (our one-base mode) and merged into
   a sequence-classification folder (TRL's reward and value model; also our `reward_kind: model`).
   Both must give the same scores (`setup.rm_check_max_abs_diff`). Random-weight models of other
   widths and a GPT-2-small-shaped one (124M parameters) are registered the same way.
2. Comparisons at equal settings (batch 16, response_length 32, 2 PPO epochs, 2 minibatches,
   same learning rate, KL coefficient, EOS penalty, AdamW eps and weight decay, no gradient
   clipping, toxicity_coef 0 in ours), one child process per run, alternating ours/TRL, one
   seed per repetition; medians of time and memory, means of quality over the seeds:
     (a) full precision: ours `--load_in_4bit false` vs TRL with policy, ref, value and reward models
     (b) ours on one 4-bit base vs TRL's 4-bit policy + LoRA (ref = adapter off), value and reward
         in full precision as TRL's example script loads them
     (b_lean) TRL only: value = 4-bit copy + LoRA, reward 4-bit: the leanest setup TRL accepts
3. Memory where the weights dominate: configuration (b) on the GPT-2-small-shaped model.
4. Scaling of ours (4-bit, random weights so every response runs to full length): episodes/s and
   peak memory vs response_length and vs width; log-log slopes.
5. Where our time goes: `timing/rollout_s` / `timing/update_s` of the runs, and one run under cProfile.

Every child runs with OMP_NUM_THREADS=`--threads` (default 1; see docs/BENCHMARKS.md: on a loaded
2-core machine two OpenMP threads made one forward 35x slower). Peak RSS is the child's
`ru_maxrss` from `os.wait4`; "above baseline" subtracts a child of the same interpreter that only
imports the libraries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEER_TRL = "trl==1.12.0"
PINNED = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers", "safetensors",
          "huggingface_hub", "numpy")
OURS_IMPORTS = ("import torch, transformers, peft, accelerate, bitsandbytes, tqdm; "
                "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification; "
                "import rlhf.actor_critic, rlhf.ppo_math, rlhf.data, rlhf.registry, rlhf.generation; "
                "from rlhf.safety import load_scorer; load_scorer('profanity-check')")
GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}


# ---------------------------------------------------------------- numbers (tests/test_bench_plumbing.py)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
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


def ours_steps(rows: list[dict], missing_eos_penalty: float) -> dict:
    """Per-step series from our metrics.jsonl rows. `score` includes the EOS penalty, as TRL's
    `objective/scores` does: score − penalty · (1 − eos_rate)."""
    return {
        "step_s": [r["timing/rollout_s"] + r["timing/update_s"] for r in rows],
        "rollout_s": [r["timing/rollout_s"] for r in rows],
        "update_s": [r["timing/update_s"] for r in rows],
        "score": [r["objective/score"] - missing_eos_penalty * (1 - r["response/eos_rate"]) for r in rows],
        "kl": [r["objective/kl"] for r in rows],
        "response_length": [r["response/length_mean"] for r in rows],
    }


def trl_steps(result: dict) -> dict:
    """Per-step series from the peer's result: step times from the step-end clock, scores and KL from its logs."""
    ends = result.get("step_end_s") or []
    logs = [r for r in result.get("logs", []) if "objective/scores" in r]
    return {
        "step_s": [b - a for a, b in zip([0.0, *ends[:-1]], ends)],
        "score": [r["objective/scores"] for r in logs],
        "kl": [r["objective/kl"] for r in logs],
    }


def standard_error(xs: list[float]) -> float | None:
    """Standard error of the mean (None with < 2 values)."""
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def summarize_run(run: dict, batch_size: int, start_score: float | None = None) -> dict:
    """Per-episode figures of one run record (see docs/BENCHMARKS.md for what each means).

    `start_score`: the SFT policy's mean score on the training prompts (`sft_start_score`), the common
    start that `score_gain` is measured from; `score_gain_within_run` is last minus first quarter."""
    steps = run.get("step_s") or []
    first, last = quarter_means(run.get("score") or [])
    _, kl_last = quarter_means(run.get("kl") or [])
    episodes = run.get("episodes") or 0
    return {
        "loop_s_per_episode": ratio(run.get("loop_s"), episodes),
        "steady_s_per_episode": ratio(median(steps[1:]) if len(steps) > 1 else median(steps), batch_size),
        "process_s_per_episode": ratio(run.get("wall_s"), episodes),
        "peak_rss_mb": run.get("peak_rss_mb"),
        "peak_rss_above_baseline_mb": run.get("peak_rss_above_baseline_mb"),
        "score_last_quarter": last,
        "score_gain": last - start_score if last is not None and start_score is not None else None,
        "score_gain_within_run": last - first if first is not None and last is not None else None,
        "kl_last_quarter": kl_last,
    }


QUALITY = ("score_last_quarter", "score_gain", "score_gain_within_run", "kl_last_quarter")


def compare(runs: list[dict], batch_size: int, start_score: float | None = None) -> dict:
    """Medians (time, memory) and seed means ± standard errors (quality) per implementation, and the
    ratios ours / TRL."""
    out: dict = {}
    for impl in ("ours", "trl"):
        ok = [summarize_run(r, batch_size, start_score) for r in runs if r["impl"] == impl and r.get("ok")]
        fig = {k: median([s[k] for s in ok]) for k in ("loop_s_per_episode", "steady_s_per_episode",
                                                        "process_s_per_episode", "peak_rss_mb",
                                                        "peak_rss_above_baseline_mb")}
        fig.update({k: mean([s[k] for s in ok]) for k in QUALITY})
        fig.update({f"{k}_se": standard_error([s[k] for s in ok]) for k in QUALITY})
        fig["start_score"] = start_score
        fig["runs_ok"] = len(ok)
        fig["errors"] = sorted({r["error"] for r in runs if r["impl"] == impl and not r.get("ok")})
        out[impl] = fig
    for k in ("loop_s_per_episode", "steady_s_per_episode", "process_s_per_episode", "peak_rss_mb",
              "peak_rss_above_baseline_mb"):
        out[f"ratio_{k}"] = ratio(out["ours"][k], out["trl"][k])
    return out


def headline(report: dict) -> dict:
    """The ratios of configuration (b) the issue asks for, at the top of the JSON (tiny model, and the
    GPT-2-small-shaped one where the weights dominate the memory)."""
    b = report.get("configs", {}).get("b", {})
    g = report.get("gpt2_small", {}).get("b", {})
    return {"wall_ratio_ours_over_trl": b.get("ratio_loop_s_per_episode"),
            "peak_rss_ratio_ours_over_trl": b.get("ratio_peak_rss_mb"),
            "gpt2_small_wall_ratio_ours_over_trl": g.get("ratio_loop_s_per_episode"),
            "gpt2_small_peak_rss_ratio_ours_over_trl": g.get("ratio_peak_rss_mb")}


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"
    return str(x)


def markdown(report: dict) -> str:
    """The tables of docs/BENCHMARKS.md from a report."""
    cols = ("loop_s_per_episode", "steady_s_per_episode", "process_s_per_episode", "peak_rss_mb",
            "peak_rss_above_baseline_mb")
    head = "| | loop s/episode | steady s/episode | process s/episode | peak RSS MiB | above baseline MiB |"
    out = [f"Mode {report['mode']}, threads {report['threads']}, load before {_f(report['load_before'][0], 2)} "
           f"/ after {_f(report.get('load_after', [None])[0], 2)}, {report.get('elapsed_s', 0) / 60:.1f} min.", ""]

    def pm(f: dict, k: str) -> str:
        se = f.get(f"{k}_se")
        return _f(f.get(k)) + (f" ± {se:.3f}" if se is not None else "")

    def block(title: str, cmp: dict, quality: bool) -> None:
        qhead = " score (last quarter) | gain over the SFT policy | last − first quarter | KL (last quarter) | runs |"
        out.extend([f"**{title}**", "", head + (qhead if quality else " runs |"),
                    "|---" * (len(cols) + (6 if quality else 2)) + "|"])
        for impl in ("ours", "trl"):
            f = cmp[impl]
            shown = "TRL 1.12" if impl == "trl" else "ours"
            q = (f" {pm(f, 'score_last_quarter')} | {pm(f, 'score_gain')} | {pm(f, 'score_gain_within_run')} | "
                 f"{_f(f['kl_last_quarter'])} |") if quality else ""
            err = f" (failed: {'; '.join(f['errors'])})" if f["errors"] else ""
            out.append(f"| {shown} | " + " | ".join(_f(f[c]) for c in cols) + f" |{q} {f['runs_ok']}{err} |")
        out.append("| ours / TRL | " + " | ".join(_f(cmp[f"ratio_{c}"]) for c in cols) + " |"
                   + (" | | | |" if quality else "") + " |")
        start = cmp["ours"].get("start_score")
        out.append(f"\nThe SFT policy's own mean score, where gains start: {_f(start)}.\n" if quality and start else "")

    names = {"a": "(a) full precision", "b": "(b) 4-bit: ours one base vs TRL 4-bit policy + LoRA, full value/reward",
             "b_lean": "(b_lean) ours (b) vs TRL 4-bit policy + LoRA, 4-bit value + LoRA, 4-bit reward"}
    for cfg, title in names.items():
        if cfg in report.get("configs", {}):
            block(title, report["configs"][cfg], quality=True)
    g = report.get("gpt2_small")
    if g:
        out.append(f"GPT-2-small shape ({g['n_params'] / 1e6:.1f}M parameters, random weights), settings "
                   + ", ".join(f"{k}={v}" for k, v in g["settings"].items() if k in
                               ("total_episodes", "batch_size", "num_ppo_epochs", "response_length")) + ":")
        out.append("")
        for key, cmp in g.items():
            if isinstance(cmp, dict) and "ours" in cmp:
                block(f"GPT-2 small, configuration {key}", cmp, quality=False)
    sc = report.get("scaling")
    if sc:
        axes = (("response_length", "response_length (width 128)"), ("width", "n_embd (response_length 32)"))
        for axis, label in axes:
            out.extend([f"**Scaling of ours vs {label}**", "",
                        "| x | parameters | s/episode (steady) | episodes/s | peak RSS MiB | above baseline MiB "
                        "| tokens/response |", "|---|---|---|---|---|---|---|"])
            for p in sc[axis]:
                figs = (p["steady_s_per_episode"], p["episodes_per_s"], p["peak_rss_mb"],
                        p["peak_rss_above_baseline_mb"], p["mean_response_tokens"])
                out.append(f"| {p['x']} | {p['n_params']} | " + " | ".join(_f(x) for x in figs) + " |")
            out.append(f"\nlog-log slope: time {_f(sc[f'{axis}_slope_time'], 2)}, "
                       f"last two points {_f(sc.get(f'{axis}_slope_time_last2'), 2)}; "
                       f"memory above baseline {_f(sc[f'{axis}_slope_rss_above_baseline'], 2)}"
                       + (f"; time vs parameters {_f(sc['width_slope_time_vs_params'], 2)}" if axis == "width" else "")
                       + "\n")
    prof = report.get("profile")
    if prof:
        t = prof["timing_fields_b"]
        out.extend([f"**Where our time goes** (configuration b): timing fields rollout {_f(t['rollout_s'])} s, "
                    f"update {_f(t['update_s'])} s, rollout share {_f(t['rollout_share'], 2)}", ""])
        runs = [(k, prof[key]) for k, key in (("tiny model", "cprofile"), ("GPT-2 small", "cprofile_gpt2"))
                if prof.get(key)]
        out.append("| part | " + " | ".join(f"{k} s | {k} share" for k, _ in runs) + " |")
        out.append("|---" * (1 + 2 * len(runs)) + "|")
        for name in PROFILED:
            out.append(f"| {name} | " + " | ".join(f"{_f(v['seconds'][name])} | {_f(v['share_of_loop'][name], 2)}"
                                                   for _, v in runs) + " |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- child processes


# A fresh, small interpreter starts each measured child and reads its rusage: ru_maxrss counts the
# memory image a process was forked from, and this script's own (models built in the setup) is large.
MEASURE = ("import json, os, subprocess, sys, time; t = time.time(); p = subprocess.Popen(sys.argv[2:]); "
           "_, status, ru = os.wait4(p.pid, 0); json.dump({'rc': os.waitstatus_to_exitcode(status), "
           "'maxrss_kb': ru.ru_maxrss, 'wall_s': time.time() - t}, open(sys.argv[1], 'w'))")


def run_child(cmd: list[str], env: dict[str, str], timeout: float, log_path: Path) -> dict:
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
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1"}


def last_error_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip() and not x.startswith(" ")]
    return lines[-1][:500] if lines else "no output"


# ---------------------------------------------------------------- the peer's virtualenv


def ensure_peer(venv: Path) -> dict[str, str]:
    """Create/refresh `.bench/trl112/` with trl==1.12.0 and our library versions; return its versions."""
    from importlib import metadata

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


def our_versions() -> dict[str, str]:
    from importlib import metadata

    return {n: metadata.version(n) for n in ("torch", "trl", *PINNED)}


# ---------------------------------------------------------------- the shared setup


@dataclass
class Setup:
    """Registry refs and folders every run uses (`.bench/work/setup.json`)."""

    registry: str
    prompts: str
    sft: str  # tiny trained model: sft entry ref
    reward_adapter: str  # same RM as an adapter on `sft` (our one-base mode)
    reward_model: str  # same RM as a seq-cls entry (our separate mode; TRL's folder below)
    rm_folder: str
    rm_check_max_abs_diff: float
    synthetic: dict[str, dict] = field(default_factory=dict)  # name -> {sft, reward_adapter, rm_folder, n_params}
    setup_s: float = 0.0


SETUP_VERSION = 3
SETUP_WIDTHS = [64, 128, 256, 512, 1024]
STAGE_ARGS = {
    "pretrain": ["--vocab_size", "2048", "--n_layer", "2", "--n_embd", "128", "--n_head", "4", "--block_size", "256",
                 "--max_steps", "150", "--learning_rate", "2e-3", "--logging_steps", "50", "--save_steps", "1000"],
    "sft": ["--max_steps", "60", "--gen_eval_samples", "0", "--learning_rate", "1e-3", "--logging_steps", "20",
            "--save_steps", "1000"],
    "reward": ["--mode", "lora", "--max_steps", "60", "--lora_dropout", "0", "--gradient_checkpointing", "false",
               "--learning_rate", "1e-3", "--logging_steps", "20", "--save_steps", "1000"],
}


def build_setup(work: Path, threads: int, rebuild: bool, widths: list[int] = SETUP_WIDTHS) -> Setup:
    """Build (or reuse) the registry of step 1 of the module docstring."""
    marker = work / "setup.json"
    key = {"version": SETUP_VERSION, "stages": STAGE_ARGS, "widths": sorted(widths)}
    if marker.exists() and not rebuild:
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            return Setup(**saved["setup"])
    t0 = time.time()
    if work.exists():
        shutil.rmtree(work)
    reg, data = work / "runs", work / "data"
    env = child_env(threads)

    def stage(*args: str) -> None:
        res = run_child([sys.executable, *args], env, 3600, work / "logs" / f"setup-{Path(args[0]).stem}.log")
        if res["rc"]:
            raise SystemExit(f"setup step {args[0]} failed (log {res['log']}):\n{res['log_tail']}")

    stage("scripts/make_demo_data.py", "--out", str(data))
    stage("stages/00_pretrain.py", "--registry", str(reg), "--data", str(data / "pretrain.jsonl"),
          *STAGE_ARGS["pretrain"])
    stage("stages/01_sft.py", "--registry", str(reg), "--data", str(data / "sft_train.jsonl"),
          "--eval_data", str(data / "sft_heldout.jsonl"), *STAGE_ARGS["sft"])
    stage("stages/02_reward.py", "--registry", str(reg), "--data", str(data / "pref_train.jsonl"),
          "--eval_data", str(data / "pref_heldout.jsonl"), *STAGE_ARGS["reward"])

    from rlhf.registry import Registry

    registry = Registry(reg)
    sft = registry.get("sft:latest")
    adapter_ref, model_ref, rm_folder, gap = export_reward(registry, registry.get("reward:latest"),
                                                           data / "pref_heldout.jsonl")
    setup = Setup(registry=str(reg), prompts=str(data / "prompts_train.jsonl"), sft=sft.ref,
                  reward_adapter=adapter_ref, reward_model=model_ref, rm_folder=rm_folder, rm_check_max_abs_diff=gap)
    for w in widths:
        setup.synthetic[f"width{w}"] = synthetic_model(registry, sft.path, n_embd=w, n_layer=2, n_head=4,
                                                       vocab_size=0, with_seqcls=False)
    setup.synthetic["gpt2_small"] = synthetic_model(registry, sft.path, **GPT2_SMALL, with_seqcls=True)
    setup.setup_s = time.time() - t0
    marker.write_text(json.dumps({"key": key, "setup": asdict(setup)}, indent=1))
    return setup


def sft_start_score(setup: Setup, s: Settings, four_bit: bool, samples: int = 4, seed: int = 12345) -> dict:
    """The SFT policy's own mean score on every training prompt, `samples` responses each, sampled and scored
    as the runs do (RM score minus the EOS penalty: TRL's `objective/scores`). Every run of both
    implementations starts from this policy, so score gains are measured from this one number."""
    from types import SimpleNamespace

    import torch

    from rlhf.actor_critic import build_actor_critic
    from rlhf.data import load_records
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer
    from rlhf.ppo import rollout
    from rlhf.registry import Registry

    registry = Registry(setup.registry)
    sft, rm = registry.get(setup.sft), registry.get(setup.reward_adapter)
    tok = load_tokenizer(str(sft.path))
    ac = build_actor_critic(str(sft.path), tok, load_in_4bit=four_bit, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
                            lora_target_modules="all-linear", reward_adapter=rm.path / "adapter",
                            reward_head=rm.path / "score_head.safetensors", separate_reward=None,
                            device=torch.device("cpu"))
    prompts = encode_prompts(tok, [r["messages"] for r in load_records(setup.prompts, "prompt")], 128)
    cfg = SimpleNamespace(temperature=s.temperature, response_length=s.response_length,
                          local_rollout_forward_batch_size=32, group_by_length=True)
    torch.manual_seed(seed)
    scores: list[float] = []
    for _ in range(samples):
        for i in range(0, len(prompts), 32):
            batch = rollout(ac, tok, prompts[i:i + 32], cfg, torch.device("cpu"))
            scores += (batch["rm_scores"] - s.missing_eos_penalty * (~batch["has_eos"]).float()).tolist()
    return {"mean": mean(scores), "se": standard_error(scores), "n": len(scores)}


def export_reward(registry, raw, heldout: Path) -> tuple[str, str, str, float]:
    """Register the RM `raw` (adapter kind) as adapter and as merged seq-cls model, head / reward_std.

    Returns (adapter ref, model ref, seq-cls folder, max |score difference| of the two on 16 held-out conversations).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.reward_model import conversation_ids, score_ids

    sft = registry.get(raw.config["base_model"])
    std = float(raw.metrics.get("reward_std", 1.0)) or 1.0
    head = {k: v / std for k, v in load_file(str(raw.path / "score_head.safetensors")).items()}
    unit = {"reward_mean": 0.0, "reward_std": 1.0, "source": raw.ref, "head_divided_by": std}

    staged = registry.staging_dir("reward")
    shutil.copytree(raw.path, staged, dirs_exist_ok=True)
    save_file(head, str(staged / "score_head.safetensors"))
    adapter = registry.register("reward", staged, parents=[sft.ref], config={**raw.config, "bench": "adapter"},
                                metrics=unit)

    tok = AutoTokenizer.from_pretrained(str(sft.path))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft.path)),
                                       str(adapter.path / "adapter")).merge_and_unload()
    staged = registry.staging_dir("reward")
    merged.save_pretrained(str(staged))
    seqcls = AutoModelForSequenceClassification.from_pretrained(str(staged), num_labels=1)
    if "bias" in head and head["bias"].abs().max() > 0:
        raise SystemExit("the reward head has a bias; a GPT-2 seq-cls score head has none")
    with torch.no_grad():
        seqcls.score.weight.copy_(head["weight"])
    seqcls.config.pad_token_id = tok.pad_token_id
    shutil.rmtree(staged)
    staged.mkdir(parents=True)
    seqcls.save_pretrained(str(staged))
    tok.save_pretrained(str(staged))
    model = registry.register("reward", staged, parents=[sft.ref], metrics=unit,
                              config={"reward_kind": "model", "base_model": sft.ref, "load_in_4bit": False,
                                      "bench": "merged seq-cls of " + adapter.ref})

    rows = [json.loads(x) for x in heldout.read_text().splitlines()[:8]]
    convs = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
    ids = [conversation_ids(tok, c) for c in convs]
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft.path)), str(adapter.path / "adapter"))
    a = score_ids(lm, ids, tok.pad_token_id, head=head)
    b = score_ids(AutoModelForSequenceClassification.from_pretrained(str(model.path)), ids, tok.pad_token_id)
    return adapter.ref, model.ref, str(model.path), float((a - b).abs().max())


def synthetic_model(registry, tokenizer_path: str, *, n_embd: int, n_layer: int, n_head: int, vocab_size: int,
                    with_seqcls: bool, n_positions: int = 512, seed: int = 0) -> dict:
    """A random-weight GPT-2 registered as `sft`, with a reward adapter (LoRA B = 0, random head) on it;
    with `with_seqcls` also the same RM as a seq-cls folder (base weights + that head) for TRL."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=max(vocab_size, len(tok)), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    staged = registry.staging_dir("sft")
    model.save_pretrained(str(staged))
    tok.save_pretrained(str(staged))
    sft = registry.register("sft", staged, parents=[], config={"bench": "random weights", **config.to_diff_dict()},
                            metrics={"n_params": n_params})
    head = {"weight": torch.randn(1, n_embd) / math.sqrt(n_embd)}  # scores of order 1
    staged = registry.staging_dir("reward")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(str(staged / "adapter"))
    save_file(head, str(staged / "score_head.safetensors"))
    tok.save_pretrained(str(staged))
    unit = {"reward_mean": 0.0, "reward_std": 1.0}
    adapter = registry.register("reward", staged, parents=[sft.ref], metrics=unit,
                                config={"reward_kind": "adapter", "base_model": sft.ref, "load_in_4bit": False})
    out = {"sft": sft.ref, "reward_adapter": adapter.ref, "rm_folder": None, "n_params": n_params, "n_embd": n_embd}
    if with_seqcls:  # LoRA B = 0: the merged RM is the base itself with the head
        seqcls = AutoModelForSequenceClassification.from_pretrained(str(sft.path), num_labels=1)
        with torch.no_grad():
            seqcls.score.weight.copy_(head["weight"])
        staged = registry.staging_dir("reward")
        seqcls.save_pretrained(str(staged))
        tok.save_pretrained(str(staged))
        out["rm_folder"] = str(registry.register(
            "reward", staged, parents=[sft.ref], metrics=unit,
            config={"reward_kind": "model", "base_model": sft.ref, "load_in_4bit": False}).path)
    return out


# ---------------------------------------------------------------- one run of each implementation


@dataclass
class Settings:
    """Hyperparameters both implementations get (option names as in TRL 1.12's PPOConfig)."""

    total_episodes: int = 128
    batch_size: int = 16  # prompts per PPO step: ours 8 x 2 minibatches, TRL per_device 16 / 2 minibatches
    num_mini_batches: int = 2
    num_ppo_epochs: int = 2
    response_length: int = 32
    learning_rate: float = 3e-4
    kl_coef: float = 0.05
    temperature: float = 1.0
    missing_eos_penalty: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    weight_decay: float = 0.01  # torch AdamW's default, which ours uses
    adam_epsilon: float = 1e-5  # ours
    local_rollout_forward_batch_size: int = 32  # TRL's rollout chunks (it also generates in chunks of this size)
    # Ours only: rows per update micro-batch and per rollout forward. The minibatch, and so every optimizer step,
    # is the same (our micro-batches are token-weighted: tests/test_ppo_stage.py); with group_by_length the rows
    # are cut into chunks by length. TRL 1.12 cannot split its minibatches this way (docs/BENCHMARKS.md).
    ours_micro_batch: int = 2
    ours_rollout_chunk: int = 4
    ours_fuse_roles: bool = True  # pays at these small chunks (docs/BENCHMARKS.md)


def ours_cmd(s: Settings, setup: Setup, *, sft: str, reward: str, four_bit: bool, seed: int) -> list[str]:
    mini = s.batch_size // s.num_mini_batches
    micro = min(s.ours_micro_batch, mini)
    if mini % micro:
        raise ValueError(f"ours_micro_batch {micro} does not divide the minibatch of {mini} rows")
    opts = {
        "registry": setup.registry, "data": setup.prompts, "sft_model": sft, "reward_model": reward,
        "load_in_4bit": str(four_bit).lower(), "seed": seed, "total_episodes": s.total_episodes,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": mini // micro,
        "num_mini_batches": s.num_mini_batches, "num_ppo_epochs": s.num_ppo_epochs,
        "response_length": s.response_length, "learning_rate": s.learning_rate, "kl_coef": s.kl_coef,
        "kl_estimator": "k1", "temperature": s.temperature, "missing_eos_penalty": s.missing_eos_penalty,
        "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
        "local_rollout_forward_batch_size": s.ours_rollout_chunk, "group_by_length": "true",
        "fuse_roles": str(s.ours_fuse_roles).lower(),
        "max_grad_norm": 1e9,  # TRL's PPO loop does not clip gradients
        "toxicity": "profanity-check", "toxicity_coef": 0, "save_steps": 10**6, "sample_steps": 10**6,
        "logging_steps": 10**6,
    }
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def run_ours(s: Settings, setup: Setup, *, label: str, sft: str, reward: str, four_bit: bool, seed: int,
             threads: int, work: Path, profile: Path | None = None, env: dict | None = None) -> dict:
    from rlhf.registry import Registry

    registry = Registry(setup.registry)
    before = {e.ref for e in registry.entries("ppo")}
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    res = run_child([sys.executable, *prof, "stages/03_ppo.py",
                     *ours_cmd(s, setup, sft=sft, reward=reward, four_bit=four_bit, seed=seed)],
                    {**child_env(threads), **(env or {})}, 3600, work / "logs" / f"{label}-ours-s{seed}.log")
    record = {"impl": "ours", "label": label, "seed": seed, "ok": res["rc"] == 0, "error": None, **res}
    new = [e for e in registry.entries("ppo") if e.ref not in before]
    if res["rc"] or not new:
        record.update(ok=False, error=last_error_line(res["log_tail"]) if res["rc"] else "no ppo entry registered")
        return record
    entry = new[-1]
    rows = [json.loads(x) for x in (entry.path / "metrics.jsonl").read_text().splitlines()]
    series = ours_steps(rows, s.missing_eos_penalty)
    record.update(series, ref=entry.ref, loop_s=sum(series["step_s"]), episodes=rows[-1]["episodes"],
                  model_memory_mb=entry.metrics.get("model_memory_mb"))
    return record


def trl_spec(s: Settings, prompt_ids: list[list[int]], *, sft_path: str, rm_path: str, policy_4bit: bool,
             value: str, reward_4bit: bool, seed: int) -> dict:
    """The peer's SPEC (scripts/bench_trl_peer.py): the same settings in PPOConfig's names."""
    return {
        "sft_path": sft_path, "rm_path": rm_path, "prompt_ids": prompt_ids, "policy_4bit": policy_4bit,
        "value": value, "reward_4bit": reward_4bit, "seed": seed, "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
        "total_episodes": s.total_episodes, "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": 1, "num_mini_batches": s.num_mini_batches, "num_ppo_epochs": s.num_ppo_epochs,
        "local_rollout_forward_batch_size": s.local_rollout_forward_batch_size,
        "response_length": s.response_length, "temperature": s.temperature, "learning_rate": s.learning_rate,
        "kl_coef": s.kl_coef, "kl_estimator": "k1", "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
        "gamma": 1.0, "lam": 0.95, "missing_eos_penalty": s.missing_eos_penalty, "whiten_rewards": False,
        "weight_decay": s.weight_decay, "adam_epsilon": s.adam_epsilon,
    }


def run_trl(s: Settings, peer_py: Path, prompt_ids: list[list[int]], *, label: str, sft_path: str, rm_path: str,
            policy_4bit: bool, value: str, reward_4bit: bool, seed: int, threads: int, work: Path,
            env: dict | None = None) -> dict:
    spec = trl_spec(s, prompt_ids, sft_path=sft_path, rm_path=rm_path, policy_4bit=policy_4bit, value=value,
                    reward_4bit=reward_4bit, seed=seed)
    folder = work / "trl" / f"{label}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    res = run_child([str(peer_py), "scripts/bench_trl_peer.py", str(folder / "spec.json"), str(folder / "out.json")],
                    {**child_env(threads), **(env or {})}, 3600, work / "logs" / f"{label}-trl-s{seed}.log")
    record = {"impl": "trl", "label": label, "seed": seed, "ok": res["rc"] == 0, "error": None, **res}
    out = json.loads((folder / "out.json").read_text()) if (folder / "out.json").exists() else {}
    if res["rc"] or not out.get("ok"):
        record.update(ok=False, error=out.get("error") or last_error_line(res["log_tail"]))
        return record
    record.update(trl_steps(out), loop_s=out["loop_s"], episodes=out["episodes"],
                  model_memory_mb=out["model_memory_mb"], trainable_params=out["trainable_params"])
    shutil.rmtree(folder / "trl_output", ignore_errors=True)
    return record


def baseline(py: str, code: list[str], label: str, threads: int, work: Path) -> dict:
    res = run_child([py, *code], child_env(threads), 600, work / "logs" / f"baseline-{label}.log")
    return {"label": label, **res}


# ---------------------------------------------------------------- profile of ours


PROFILED = {  # name: (file suffix, function name[, caller function name])
    "rollout": ("rlhf/ppo.py", "rollout"),
    "rollout/generate": ("rlhf/actor_critic.py", "generate"),
    "rollout/ref_value_reward": ("rlhf/actor_critic.py", "rollout_forward"),  # one forward for the three roles
    "rollout/ref_value_reward/model": ("rlhf/actor_critic.py", "_mixed_hidden", "rollout_forward"),  # heads aside
    "decode_and_toxicity": ("rlhf/safety.py", "score"),
    "update": ("rlhf/ppo.py", "ppo_update"),
    "update/policy_value": ("rlhf/actor_critic.py", "update_forward"),  # one forward for both roles
    "update/policy_value/model": ("rlhf/actor_critic.py", "_mixed_hidden", "update_forward"),
    "update/backward": ("torch/_tensor.py", "backward"),
    "update/optimizer_step": ("torch/optim/adam.py", "step"),  # torch 2.13's AdamW is Adam's step
}


def profile_shares(path: Path) -> dict:
    """Cumulative seconds of the PROFILED functions in a cProfile file, and their share of rollout + update."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
    out = {}
    for name, (suffix, func, *caller) in PROFILED.items():
        total = 0.0
        for (file, _, fn), (_, _, _, ct, callers) in stats.items():
            if fn != func or not file.endswith(suffix):
                continue
            if caller:
                total += sum(c[3] for (cf, _, cfn), c in callers.items() if cfn == caller[0])
            else:
                total += ct
        out[name] = total
    loop = out["rollout"] + out["update"]
    return {"seconds": out, "share_of_loop": {k: ratio(v, loop) for k, v in out.items()}}


# ---------------------------------------------------------------- the benchmark


def machine() -> dict:
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), platform.processor())
    mem = next((int(x.split()[1]) / 2**20 for x in Path("/proc/meminfo").read_text().splitlines()
                if x.startswith("MemTotal")), None)
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None, "cpu": cpu, "gpu": False,
            "python": platform.python_version()}


def load() -> list[float]:
    return list(os.getloadavg())


def plan(quick: bool) -> dict:
    """What each mode runs: episodes, seeds per configuration, the GPT-2-small settings, scaling points."""
    if quick:
        return {"episodes": 128, "seeds": {"a": [0], "b": [0, 1, 2], "b_lean": [0]},
                "gpt2": {"total_episodes": 8, "batch_size": 8, "num_ppo_epochs": 1, "response_length": 16},
                "gpt2_configs": ["b"], "gpt2_malloc_variant": False, "profile_gpt2": False,
                "scale_episodes": 48, "lengths": [16, 32, 64, 128], "widths": [64, 128, 256, 512]}
    return {"episodes": 512, "seeds": {"a": [0, 1, 2], "b": list(range(10)), "b_lean": [0, 1, 2]},
            "gpt2": {"total_episodes": 16, "batch_size": 16, "num_ppo_epochs": 2, "response_length": 32},
            "gpt2_configs": ["b", "a"], "gpt2_malloc_variant": True, "profile_gpt2": True,
            "scale_episodes": 64, "lengths": [16, 32, 64, 128], "widths": [64, 128, 256, 512, 1024]}


# glibc keeps freed heap memory (its mmap threshold grows with the largest freed block, up to 32 MiB), so a
# run's peak RSS also counts activations freed long before. Ours fixes the threshold at 4 MiB itself
# (`cpu_mmap_threshold_mb`, rlhf/allocator.py); this variant gives TRL the same setting through the
# environment (ours then takes it from there too), to show what is left when both have it.
SAME_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}


PEER = {"a": dict(policy_4bit=False, value="full", reward_4bit=False),
        "b": dict(policy_4bit=True, value="full", reward_4bit=False),
        "b_lean": dict(policy_4bit=True, value="qlora", reward_4bit=True)}


class Bench:
    """What every part needs: the setup, the baselines, the report being filled, and one call per run."""

    def __init__(self, args: argparse.Namespace, pl: dict):
        self.args, self.pl, self.t0 = args, pl, time.time()
        self.peer_py = args.peer_venv / "bin" / "python"
        self.report: dict = {"mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "load_before": load(), "machine": machine(), "threads": args.threads, "plan": pl,
                             "git_commit": git_commit(), "versions": {"ours": our_versions()}, "runs": [],
                             "configs": {}}
        if not args.skip_peer:
            self.say("peer virtualenv")
            self.report["versions"]["trl_peer"] = ensure_peer(args.peer_venv)
        self.say("setup")
        self.setup = build_setup(args.work, args.threads, args.rebuild_setup)
        self.settings = Settings(total_episodes=pl["episodes"])
        self.report.update(setup=asdict(self.setup), settings=asdict(self.settings))

        from rlhf.data import load_records
        from rlhf.generation import encode_prompts
        from rlhf.models import load_tokenizer
        from rlhf.registry import Registry

        self.registry = Registry(self.setup.registry)
        self.sft_path = str(self.registry.get(self.setup.sft).path)
        messages = [r["messages"] for r in load_records(self.setup.prompts, "prompt")]
        self.prompt_ids = encode_prompts(load_tokenizer(self.sft_path), messages, 128)
        self.say("baselines")
        self.base = {"ours": baseline(sys.executable, ["-c", OURS_IMPORTS], "ours", args.threads, args.work)}
        if not args.skip_peer:
            self.base["trl"] = baseline(str(self.peer_py), ["scripts/bench_trl_peer.py", "--imports-only"], "trl",
                                        args.threads, args.work)
        self.report["baseline"] = self.base

    def start_score(self, s: Settings, four_bit: bool) -> float:
        """`sft_start_score` for these settings, computed once per setup (cached in the work folder)."""
        cache = self.args.work / "start_scores.json"
        saved = json.loads(cache.read_text()) if cache.exists() else {}
        key = json.dumps({"setup": self.setup.sft, "reward": self.setup.reward_adapter, "four_bit": four_bit,
                          "response_length": s.response_length, "temperature": s.temperature,
                          "missing_eos_penalty": s.missing_eos_penalty})
        if key not in saved:
            import torch

            torch.set_num_threads(self.args.threads)
            self.say(f"start score of the SFT policy ({'4-bit' if four_bit else 'full precision'})")
            saved[key] = sft_start_score(self.setup, s, four_bit)
            cache.write_text(json.dumps(saved, indent=1))
        self.report.setdefault("start_scores", {})["4bit" if four_bit else "full"] = saved[key]
        return saved[key]["mean"]

    def say(self, msg: str) -> None:
        print(f"[bench {time.time() - self.t0:6.0f}s load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)

    def add(self, record: dict, batch_size: int) -> dict:
        b = self.base.get(record["impl"])
        record["peak_rss_above_baseline_mb"] = record["peak_rss_mb"] - b["peak_rss_mb"] if b else None
        self.report["runs"].append(record)
        s = summarize_run(record, batch_size)
        self.say(f"{record['label']:<14} {record['impl']:<4} seed {record['seed']}: "
                 + (f"{s['loop_s_per_episode'] or 0:.3f} s/ep, peak {record['peak_rss_mb']:.0f} MiB, "
                    f"score (last quarter) {s['score_last_quarter'] or 0:.3f}, kl {s['kl_last_quarter'] or 0:.3f}"
                    if record["ok"]
                    else f"FAILED: {record['error']}"))
        return record

    def ours(self, label: str, s: Settings, *, sft: str, reward: str, four_bit: bool, seed: int, **kw) -> dict:
        return self.add(run_ours(s, self.setup, label=label, sft=sft, reward=reward, four_bit=four_bit, seed=seed,
                                 threads=self.args.threads, work=self.args.work, **kw), s.batch_size)

    def trl(self, label: str, s: Settings, *, sft_path: str, rm_path: str, seed: int, **kw) -> dict:
        return self.add(run_trl(s, self.peer_py, self.prompt_ids, label=label, sft_path=sft_path, rm_path=rm_path,
                                seed=seed, threads=self.args.threads, work=self.args.work, **kw), s.batch_size)

    def pick(self, label: str, impl: str | None = None) -> list[dict]:
        return [r for r in self.report["runs"] if r["label"] == label and impl in (None, r["impl"])]


def part_compare(b: Bench) -> None:
    """Step 2: configurations (a), (b), (b_lean) on the tiny trained model, alternating ours / TRL per seed."""
    seeds, s, su = b.pl["seeds"], b.settings, b.setup
    for seed in sorted(set(seeds["a"]) | set(seeds["b"]) | set(seeds["b_lean"])):
        for cfg, four_bit in (("a", False), ("b", True)):
            if seed in seeds[cfg]:
                b.ours(cfg, s, sft=su.sft, reward=su.reward_adapter, four_bit=four_bit, seed=seed)
                if not b.args.skip_peer:
                    b.trl(cfg, s, sft_path=b.sft_path, rm_path=su.rm_folder, seed=seed, **PEER[cfg])
        if not b.args.skip_peer and seed in seeds["b_lean"]:
            b.trl("b_lean", s, sft_path=b.sft_path, rm_path=su.rm_folder, seed=seed, **PEER["b_lean"])
    configs = b.report["configs"]
    start = {cfg: b.start_score(s, four_bit=cfg != "a") for cfg in ("a", "b")}
    for cfg in ("a", "b"):
        configs[cfg] = compare(b.pick(cfg), s.batch_size, start[cfg])
    configs["b_lean"] = compare(b.pick("b", "ours") + b.pick("b_lean"), s.batch_size, start["b"])


def part_gpt2(b: Bench) -> None:
    """Step 3: memory where the weights dominate (GPT-2-small shape, random weights): each side as it ships,
    and (full plan) TRL given our allocator setting too."""
    g = b.setup.synthetic["gpt2_small"]
    gs = Settings(**b.pl["gpt2"])
    g_path = str(b.registry.get(g["sft"]).path)
    out = b.report["gpt2_small"] = {"n_params": g["n_params"], "settings": asdict(gs)}
    variants = [("", None)] + ([("_same_allocator", SAME_ALLOCATOR)] if b.pl["gpt2_malloc_variant"] else [])
    for cfg in b.pl["gpt2_configs"]:
        for suffix, env in variants:
            label = f"gpt2_{cfg}{suffix}"
            b.ours(label, gs, sft=g["sft"], reward=g["reward_adapter"], four_bit=cfg == "b", seed=0, env=env)
            if not b.args.skip_peer:
                b.trl(label, gs, sft_path=g_path, rm_path=g["rm_folder"], seed=0, env=env, **PEER[cfg])
            out[cfg + suffix] = compare(b.pick(label), gs.batch_size)
    if "b" in b.pl["gpt2_configs"]:  # ours cut as TRL cuts: micro-batch = minibatch, rollout chunks of TRL's size
        as_trl = replace(gs, ours_micro_batch=gs.batch_size // gs.num_mini_batches,
                         ours_rollout_chunk=gs.local_rollout_forward_batch_size)
        b.ours("gpt2_b_chunks_as_trl", as_trl, sft=g["sft"], reward=g["reward_adapter"], four_bit=True, seed=0)
        out["b_chunks_as_trl"] = compare(b.pick("gpt2_b_chunks_as_trl") + b.pick("gpt2_b", "trl"), gs.batch_size)


def part_scaling(b: Bench) -> None:
    """Step 4: ours (4-bit, one base) on random-weight models, where every response runs to full length."""
    scaling: dict = {"response_length": [], "width": []}
    done: dict = {}
    for axis, values in (("response_length", b.pl["lengths"]), ("width", b.pl["widths"])):
        for x in values:
            width, length = (128, x) if axis == "response_length" else (x, 32)
            if (width, length) not in done:
                m = b.setup.synthetic[f"width{width}"]
                s = Settings(total_episodes=b.pl["scale_episodes"], response_length=length)
                r = b.ours(f"scale_W{width}_R{length}", s, sft=m["sft"], reward=m["reward_adapter"], four_bit=True,
                           seed=0)
                fig = summarize_run(r, s.batch_size)
                done[(width, length)] = {"n_params": m["n_params"], **fig,
                                         "episodes_per_s": ratio(1.0, fig["steady_s_per_episode"]),
                                         "mean_response_tokens": mean(r.get("response_length") or [])}
            scaling[axis].append({"x": x, **done[(width, length)]})
    for axis in ("response_length", "width"):
        pts = scaling[axis]
        xs, times = [p["x"] for p in pts], [p["steady_s_per_episode"] for p in pts]
        scaling[f"{axis}_slope_time"] = loglog_slope(xs, times)
        scaling[f"{axis}_slope_time_last2"] = loglog_slope(xs[-2:], times[-2:])
        scaling[f"{axis}_slope_rss_above_baseline"] = loglog_slope(xs, [p["peak_rss_above_baseline_mb"] for p in pts])
    scaling["width_slope_time_vs_params"] = loglog_slope([p["n_params"] for p in scaling["width"]],
                                                         [p["steady_s_per_episode"] for p in scaling["width"]])
    b.report["scaling"] = scaling


def part_profile(b: Bench) -> None:
    """Step 5: the timing fields of our (b) runs, and one (b) run under cProfile (also GPT-2 small, full plan)."""
    b_runs = [r for r in b.pick("b", "ours") if r["ok"]]
    split = {"rollout_s": sum(sum(r["rollout_s"]) for r in b_runs),
             "update_s": sum(sum(r["update_s"]) for r in b_runs)}
    split["rollout_share"] = ratio(split["rollout_s"], split["rollout_s"] + split["update_s"])
    out = b.report["profile"] = {"timing_fields_b": split}
    su = b.setup
    runs = [("cprofile", "profile_b", b.settings, su.sft, su.reward_adapter)]
    if b.pl["profile_gpt2"]:
        g = su.synthetic["gpt2_small"]
        runs.append(("cprofile_gpt2", "profile_gpt2_b", Settings(**b.pl["gpt2"]), g["sft"], g["reward_adapter"]))
    for key, label, s, sft, reward in runs:
        path = b.args.work / f"{label}.prof"
        r = b.ours(label, s, sft=sft, reward=reward, four_bit=True, seed=0, profile=path)
        out[key] = profile_shares(path) if r["ok"] else None
        out[key + "_file"] = str(path)


PARTS = {"compare": part_compare, "gpt2": part_gpt2, "scaling": part_scaling, "profile": part_profile}


def git_commit() -> str | None:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return res.stdout.strip() or None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short plan (< 15 min on 2 cores)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--markdown", type=Path, help="also write the tables of docs/BENCHMARKS.md here")
    p.add_argument("--skip-peer", action="store_true", help="ours only: no TRL virtualenv, no TRL runs")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "work", help="setup and run folder")
    p.add_argument("--peer-venv", type=Path, default=ROOT / ".bench" / "trl112", help="TRL 1.12 virtualenv")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every child (default 1)")
    p.add_argument("--rebuild-setup", action="store_true", help="rebuild .bench/work from scratch")
    p.add_argument("--tables-from", type=Path, help="only print the tables of an earlier --json report")
    args = p.parse_args(argv)
    if args.tables_from:
        report = json.loads(args.tables_from.read_text())
        print(markdown(report))
        return report
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")

    bench = Bench(args, plan(args.quick))
    for name, part in PARTS.items():
        if name in args.parts.split(","):
            part(bench)
    report = bench.report
    report.update(headline(report))
    report.update(load_after=load(), git_commit_after=git_commit(), elapsed_s=time.time() - bench.t0)
    bench.say(f"done in {report['elapsed_s']:.0f} s: " + json.dumps(headline(report)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
