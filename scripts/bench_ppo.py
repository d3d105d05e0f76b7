"""Benchmark our PPO (stages/03_ppo.py) side by side with TRL 1.12's PPOTrainer, and how our cost grows; our
critic-free estimators side by side with TRL 1.16's GRPOTrainer and RLOOTrainer.

    .venv/bin/python scripts/bench_ppo.py --quick --json .bench/quick.json    # the short plan
    .venv/bin/python scripts/bench_ppo.py --json .bench/full.json             # the full run
    .venv/bin/python scripts/bench_ppo.py --quick --skip-peer                 # ours only, no TRL venv

Steps (docs/BENCHMARKS.md explains every figure, says how long each plan takes, and shows the results;
the code is the package scripts/bench/):

0. The peer: its own virtualenv `.bench/trl112/` (git-ignored) with torch, trl==1.12.0 and the
   transformers/peft/bitsandbytes/accelerate/datasets versions of ours, pinned with `==` to what
   this interpreter has. It runs `scripts/bench_trl_peer.py`; no TRL code is copied here.
1. The shared setup, built once in `.bench/work/` (kept; `--rebuild-setup` redoes it): demo data;
   a tiny GPT-2-style model through our stage CLIs (pretrain -> sft -> a LoRA reward model).
   The reward model's head is divided by its held-out std; it is registered twice with
   reward_mean 0 / reward_std 1: as an adapter on the SFT base (our one-base mode) and merged into
   a sequence-classification folder (TRL's reward and value model; also our `reward_kind: model`).
   Both must give the same scores (`setup.rm_check_max_abs_diff`). Random-weight models of other
   widths and a GPT-2-small-shaped one are registered the same way.
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
6. Critic-free estimators (`--parts critic_free`): ours with `--advantage_estimator grpo` and `rloo` beside
   TRL 1.16's GRPOTrainer and RLOOTrainer, the TRL this project installs, run by this interpreter through
   `scripts/bench_trl_critic_free.py` (no extra virtualenv): 4-bit NF4 base + LoRA on both sides, the same prompts,
   k = 4 responses per prompt, response length, learning rate, optimizer steps and reward (our RM and toxicity
   scorer handed to TRL as reward functions), β as TRL places it (GRPO: a k3 loss term; RLOO: k1 in the reward);
   on the tiny model (cost and quality) and the GPT-2-small shape (cost: the `grpo_*` / `rloo_*` ratios of the JSON).

Every child runs with OMP_NUM_THREADS=`--threads` (default 1: OpenMP threads spin against other
processes on a shared machine; docs/BENCHMARKS.md). Peak RSS is the child's `ru_maxrss` from
`os.wait4`; "above baseline" subtracts a child of the same interpreter that only imports the libraries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # rlhf, for the setup and our runs; scripts/ (this folder) holds bench/

from bench import environment, report  # noqa: E402
from bench.parts import PARTS, Bench, plan  # noqa: E402
from bench.stats import headline  # noqa: E402


def parser() -> argparse.ArgumentParser:
    """The command line; the module docstring is its description."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short plan: fewer episodes, seeds and scaling points")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--markdown", type=Path, help="also write the tables of docs/BENCHMARKS.md here")
    p.add_argument("--skip-peer", action="store_true", help="ours only: no TRL virtualenv, no TRL runs (1.12 or 1.16)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--work", type=Path, default=ROOT / ".bench" / "work", help="setup and run folder")
    p.add_argument("--peer-venv", type=Path, default=ROOT / ".bench" / "trl112", help="TRL 1.12 virtualenv")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every child (default 1)")
    p.add_argument("--rebuild-setup", action="store_true", help="rebuild .bench/work from scratch")
    p.add_argument("--tables-from", type=Path, help="only print the tables of an earlier --json report")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen parts and write the report (or only print the tables of a saved one); return the report."""
    p = parser()
    args = p.parse_args(argv)
    if args.tables_from:
        saved = json.loads(args.tables_from.read_text())
        print(report.markdown(saved))
        return saved
    chosen = args.parts.split(",")
    unknown = set(chosen) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")

    bench = Bench(args, plan(args.quick))
    for name, part in PARTS.items():
        if name in chosen:
            part(bench)
    out = bench.report
    out.update(headline(out))
    out.update(load_after=environment.load(), git_commit_after=environment.git_commit(),
               elapsed_s=time.time() - bench.t0)
    bench.say(f"done in {out['elapsed_s']:.0f} s: " + json.dumps(headline(out)))
    report.write(out, args.json, args.markdown)
    return out


if __name__ == "__main__":
    main()
