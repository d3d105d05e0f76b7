"""What a benchmark runs: the plan of each mode, and its four parts, each filling its section of the report.

    compare   configurations (a), (b), (b_lean) on the tiny trained model, alternating ours / TRL per seed
    gpt2      memory where the weights dominate: the GPT-2-small-shaped model
    scaling   ours against response length and width
    profile   where our time goes: the timing fields of our (b) runs and cProfile runs
    critic_free  GRPO and RLOO, ours beside TRL 1.16's GRPOTrainer / RLOOTrainer (bench.critic_free)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Any, Callable

from . import environment
from .critic_free import part_critic_free
from .profiling import profile_shares
from .runs import Settings, baselines, run_ours, run_trl
from .setups import build_setup, sft_start_score
from .stats import compare, loglog_slope, mean, ratio, summarize_run


def plan(quick: bool) -> dict[str, Any]:
    """What each mode runs: episodes, seeds per configuration, the GPT-2-small settings, scaling points."""
    if quick:
        return {"episodes": 128, "seeds": {"a": [0], "b": [0, 1, 2], "b_lean": [0]},
                "gpt2": {"total_episodes": 8, "batch_size": 8, "num_ppo_epochs": 1, "response_length": 16},
                "gpt2_configs": ["b"], "gpt2_malloc_variant": False, "profile_gpt2": False,
                "scale_episodes": 48, "lengths": [16, 32, 64, 128], "widths": [64, 128, 256, 512],
                "critic_free": {"episodes": 96, "seeds": [0], "gpt2_seeds": [0], "profile_gpt2": False,
                                "gpt2": {"total_episodes": 16, "batch_size": 8, "num_ppo_epochs": 1,
                                         "response_length": 16}}}
    return {"episodes": 512, "seeds": {"a": [0, 1, 2], "b": list(range(10)), "b_lean": [0, 1, 2]},
            "gpt2": {"total_episodes": 16, "batch_size": 16, "num_ppo_epochs": 2, "response_length": 32},
            "gpt2_configs": ["b", "a"], "gpt2_malloc_variant": True, "profile_gpt2": True,
            "scale_episodes": 64, "lengths": [16, 32, 64, 128], "widths": [64, 128, 256, 512, 1024],
            "critic_free": {"episodes": 512, "seeds": [0, 1, 2], "gpt2_seeds": [0, 1], "profile_gpt2": True,
                            "gpt2": {"total_episodes": 32, "batch_size": 16, "num_ppo_epochs": 2,
                                     "response_length": 32}}}


# glibc keeps freed heap memory (its mmap threshold grows with the largest freed block, up to 32 MiB), so a
# run's peak RSS also counts activations freed long before. Ours fixes the threshold at 4 MiB itself
# (`cpu_mmap_threshold_mb`, rlhf/quant.py); this variant gives TRL the same setting through the
# environment (ours then takes it from there too), to show what is left when both have it.
SAME_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)}

# How TRL loads each configuration (scripts/bench_trl_peer.py); ours is one base, 4-bit except in (a).
PEER = {"a": dict(policy_4bit=False, value="full", reward_4bit=False),
        "b": dict(policy_4bit=True, value="full", reward_4bit=False),
        "b_lean": dict(policy_4bit=True, value="qlora", reward_4bit=True)}


class Bench:
    """What every part needs: the setup, the baselines, the report being filled, and one call per run."""

    def __init__(self, args: argparse.Namespace, pl: dict[str, Any]):
        self.args, self.pl, self.t0 = args, pl, time.time()
        self.peer_py = args.peer_venv / "bin" / "python"
        self.report: dict[str, Any] = {
            "mode": "quick" if args.quick else "full", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_before": environment.load(), "machine": environment.machine(), "threads": args.threads,
            "plan": pl, "git_commit": environment.git_commit(), "versions": {"ours": environment.our_versions()},
            "runs": [], "configs": {}}
        # The TRL 1.12 virtualenv serves the PPO comparisons only (the critic-free part runs the TRL of this venv).
        uses_peer = not args.skip_peer and bool(set(args.parts.split(",")) & {"compare", "gpt2"})
        if uses_peer:
            self.say("peer virtualenv")
            self.report["versions"]["trl_peer"] = environment.ensure_peer(args.peer_venv)
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
        self.prompt_messages = [r["messages"] for r in load_records(self.setup.prompts, "prompt")]
        self.prompt_ids = encode_prompts(load_tokenizer(self.sft_path), self.prompt_messages, 128)  # TRL gets our ids
        self.say("baselines")
        self.base = baselines(self.peer_py if uses_peer else None, args.threads, args.work)
        self.report["baseline"] = self.base

    def start_score(self, s: Settings, four_bit: bool, label: str | None = None) -> float:
        """`sft_start_score` for these settings, computed once per setup (cached in the work folder); recorded in
        the report's `start_scores` under `label` (default: "4bit" or "full")."""
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
        self.report.setdefault("start_scores", {})[label or ("4bit" if four_bit else "full")] = saved[key]
        return saved[key]["mean"]

    def say(self, msg: str) -> None:
        print(f"[bench {time.time() - self.t0:6.0f}s load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)

    def add(self, record: dict[str, Any], batch_size: int, baseline: str | None = None) -> dict[str, Any]:
        """Record a run in the report, with its peak above its side's baseline (`baseline`: the key of another
        import-only child than its implementation's), and log one line of it."""
        b = self.base.get(baseline or record["impl"])
        record["peak_rss_above_baseline_mb"] = record["peak_rss_mb"] - b["peak_rss_mb"] if b else None
        self.report["runs"].append(record)
        s = summarize_run(record, batch_size)
        self.say(f"{record['label']:<14} {record['impl']:<4} seed {record['seed']}: "
                 + (f"{s['loop_s_per_episode'] or 0:.3f} s/ep, peak {record['peak_rss_mb']:.0f} MiB, "
                    f"score (last quarter) {s['score_last_quarter'] or 0:.3f}, kl {s['kl_last_quarter'] or 0:.3f}"
                    if record["ok"]
                    else f"FAILED: {record['error']}"))
        return record

    def ours(self, label: str, s: Settings, *, sft: str, reward: str, four_bit: bool, seed: int,
             **kw: Any) -> dict[str, Any]:
        return self.add(run_ours(s, self.setup, label=label, sft=sft, reward=reward, four_bit=four_bit, seed=seed,
                                 threads=self.args.threads, work=self.args.work, **kw), s.batch_size)

    def trl(self, label: str, s: Settings, *, sft_path: str, rm_path: str, seed: int, **kw: Any) -> dict[str, Any]:
        return self.add(run_trl(s, self.peer_py, self.prompt_ids, label=label, sft_path=sft_path, rm_path=rm_path,
                                seed=seed, threads=self.args.threads, work=self.args.work, **kw), s.batch_size)

    def pick(self, label: str, impl: str | None = None) -> list[dict[str, Any]]:
        """The runs recorded under `label` (of one implementation when `impl` is given)."""
        return [r for r in self.report["runs"] if r["label"] == label and impl in (None, r["impl"])]


def part_compare(b: Bench) -> None:
    """Configurations (a), (b), (b_lean) on the tiny trained model, alternating ours / TRL per seed."""
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
    """Memory where the weights dominate (GPT-2-small shape, random weights): each side as it ships,
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
    """Ours (4-bit, one base) on random-weight models, where every response runs to full length."""
    scaling: dict[str, Any] = {"response_length": [], "width": []}
    done: dict[tuple[int, int], dict[str, Any]] = {}  # the point both axes share runs once
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
    """The timing fields of our (b) runs, and one (b) run under cProfile (also GPT-2 small, full plan)."""
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


PARTS: dict[str, Callable[[Bench], None]] = {"compare": part_compare, "gpt2": part_gpt2, "scaling": part_scaling,
                                             "profile": part_profile, "critic_free": part_critic_free}
