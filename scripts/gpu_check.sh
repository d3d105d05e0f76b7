#!/usr/bin/env bash
# The GPU check: what CPU-only CI cannot run, run on a machine with CUDA, in about 8 minutes on one modern GPU.
#
#     scripts/gpu_check.sh [--budget SECONDS] [--work DIR] [--python PY]    # on a CUDA machine
#     scripts/gpu_check.sh --dry-run                                         # anywhere: the plumbing only
#
# Checks, in this order, each under what is left of the budget (default 480 s), each logged to WORK/logs/NAME.log:
#   cuda         a bitsandbytes 4-bit NF4 layer quantized on the GPU computes what its dequantized weights give,
#                in bf16 where the GPU supports it (fp16 elsewhere)
#   tests        the tests that take the `device` fixture (tests/conftest.py), with RLHF_DEVICE=cuda:
#                rollout, fused-roles and value-adapter invariances in full precision and 4-bit, the detoxify scorer
#   pipeline     the demo pipeline (scripts/run_pipeline.py, configs/demo) with fewer steps, roles unfused; the
#                stages pick CUDA, bf16 where supported, bitsandbytes' CUDA 4-bit kernels (reward QLoRA, PPO base)
#   ppo-fused    stage 03 again on the same entries with fuse_roles: true
#   entries      the registry says so: two ppo entries (fuse_roles false, true), each on a 4-bit base computing in
#                bf16 where supported; a qlora reward entry; the report
#   bench-gpt2   scripts/bench_ppo.py --quick --skip-peer --parts gpt2 (ours on the GPT-2-small-shaped model);
#                every run must succeed
# Then one table (check, status, seconds). Exit 0 only when every check passed. Asked for CUDA where there is none,
# it stops at once with one line and exit 1: it never skips and never falls back to the CPU.
#
# --dry-run (for CI, through tests/test_gpu_check.py): prints each command it would run and runs a stand-in that
# proves its plumbing on the CPU: the 4-bit layer on the CPU, the selection of the device tests, the pipeline's
# stage commands with their overrides (run_pipeline.py --dry-run), the registry check's imports, the bench's
# arguments; then the same table.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.." || exit 2

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }

DRY=0
BUDGET=480
WORK=""
PY="${PYTHON:-.venv/bin/python}"
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        --work) WORK="${2:?--work needs a folder}"; shift ;;
        --python) PY="${2:?--python needs an interpreter}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget '$BUDGET' is not a whole number of seconds" >&2; exit 2; }
command -v "$PY" >/dev/null || { echo "gpu_check: no Python at '$PY' (make setup, or --python PY)" >&2; exit 2; }

# ------------------------------------------------------------------------------------------ the Python pieces

read -r -d '' CUDA_SMOKE <<'PY'
import sys

import bitsandbytes as bnb
import torch

dry = "--dry-run" in sys.argv
if not dry and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}: torch.cuda.is_available() is False")
dev = torch.device("cpu" if dry else "cuda")
bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
dtype = torch.bfloat16 if bf16 else (torch.float16 if dev.type == "cuda" else torch.float32)
torch.manual_seed(0)
weight = torch.randn(128, 256) / 16
layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=dtype, quant_type="nf4")
layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
layer = layer.to(dev)  # bitsandbytes quantizes on the move
x = torch.randn(8, 256, device=dev, dtype=dtype)
y = layer(x)
w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
ref = x @ w.t()
err = (y.float() - ref.float()).abs().max().item()
quant_err = (w.float().cpu() - weight).abs().max().item()
assert layer.weight.dtype == torch.uint8 and y.device.type == dev.type and y.dtype == dtype, (layer.weight.dtype, y)
assert err <= 0.02 * ref.abs().max().item() and quant_err < 0.1, (err, quant_err)
name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (--dry-run)"
print(f"{name}: torch {torch.__version__} (CUDA {torch.version.cuda}), bf16 {'yes' if bf16 else 'no'}, "
      f"bitsandbytes {bnb.__version__} NF4 matmul in {str(dtype)[6:]} ok (max |err| {err:.1e}, quantization {quant_err:.2f})")
PY

read -r -d '' ENTRIES <<'PY'
import sys
from pathlib import Path

from rlhf.registry import Registry

root = Path(sys.argv[1])
if "--dry-run" in sys.argv:
    print(f"would check {root}: ppo entries with fuse_roles false and true, 4-bit bases in bf16 where supported, "
          "a qlora reward entry, report/report.md")
    sys.exit(0)
import torch

want = "torch.bfloat16" if torch.cuda.is_bf16_supported() else "torch.float32"
reg = Registry(root)
ppo = reg.entries("ppo")
problems = []
if sorted(str(e.config.get("fuse_roles")) for e in ppo) != ["False", "True"]:
    problems.append(f"expected two ppo entries, fuse_roles false and true; got {[e.config.get('fuse_roles') for e in ppo]}")
for e in ppo:
    loading = e.config["base_loading"]
    if not loading["load_in_4bit"] or loading["compute_dtype"] != want:
        problems.append(f"{e.ref}: base_loading {loading}, expected a 4-bit base computing in {want}")
reward = reg.get("reward:latest")
if reward.config.get("mode") != "qlora":
    problems.append(f"{reward.ref}: mode {reward.config.get('mode')!r}, expected qlora")
if not (root / "report" / "report.md").is_file():
    problems.append(f"no {root / 'report' / 'report.md'}")
if problems:
    sys.exit("; ".join(problems))
print(f"{len(ppo)} ppo entries (fused and not) on 4-bit bases in {want}; reward {reward.ref} qlora; report written")
PY

read -r -d '' BENCH_ARGS <<'PY'
import sys

sys.path.insert(0, "scripts")
import bench_ppo
from bench.parts import PARTS

args = bench_ppo.parser().parse_args(sys.argv[1:])
unknown = set(args.parts.split(",")) - set(PARTS)
if unknown:
    sys.exit(f"bench_ppo.py: unknown parts {sorted(unknown)}")
print(f"bench_ppo.py would run parts {args.parts} (quick {args.quick}, skip_peer {args.skip_peer}) in {args.work}")
PY

read -r -d '' BENCH_OK <<'PY'
import json
import sys

runs = [r for r in json.load(open(sys.argv[1]))["runs"] if r["label"].startswith("gpt2")]
bad = [f"{r['label']}: {r['error']}" for r in runs if not r["ok"]]
if not runs or bad:
    sys.exit("bench: " + ("; ".join(bad) or "no GPT-2-small run"))
for r in runs:
    print(f"{r['label']}: {r['episodes']} episodes, loop {r['loop_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB")
PY

# ------------------------------------------------------------------------------------------ the checks

WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK/logs" || exit 2
REG="$WORK/runs"
PIPELINE=(scripts/run_pipeline.py --config configs/demo/pipeline.yaml --registry "$REG")
# Fewer steps than the demo: every path runs, the whole check stays within its budget.
SMALL=(--override pretrain:max_steps=120 --override sft:max_steps=60 --override sft:gen_eval_samples=16
       --override reward:max_steps=60 --override ppo:total_episodes=256 --override compare:max_prompts=24
       --override compare:samples_per_prompt=2 --override compare:bootstrap_resamples=200)
BENCH=(--quick --skip-peer --parts gpt2 --work "$WORK/bench" --json "$WORK/bench.json")

START=$(date +%s)
remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# A command as a shell would take it, the Python pieces above by their names.
# shellcheck disable=SC2016  # the names are printed, not expanded
show() {
    local a out=()
    for a; do
        case "$a" in
            "$CUDA_SMOKE") out+=('"$CUDA_SMOKE"') ;;
            "$ENTRIES") out+=('"$ENTRIES"') ;;
            "$BENCH_ARGS") out+=('"$BENCH_ARGS"') ;;
            "$BENCH_OK") out+=('"$BENCH_OK"') ;;
            *) out+=("$(printf '%q' "$a")") ;;
        esac
    done
    echo "${out[*]}"
}
# One command of a check: run it under what is left of the budget, or with --dry-run only say it (on fd 3, the
# console; everything else goes to the check's log).
real() {
    local left
    echo "+ $(show "$@")"
    if ((DRY)); then
        echo "  would run: $(show "$@")" >&3
        return 0
    fi
    left=$(remaining)
    ((left > 0)) || return 124  # `timeout 0` would mean no limit at all
    timeout --kill-after=10 "$left" "$@"
}
# A dry run's stand-in for the commands around it; a real run skips it.
tiny() {
    ((DRY)) || return 0
    echo "+ $(show "$@")"
    timeout 120 "$@"
}

check_cuda() {
    real "$PY" -c "$CUDA_SMOKE" && tiny "$PY" -c "$CUDA_SMOKE" --dry-run
}
check_tests() {
    real env RLHF_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -m device tests &&
        tiny env RLHF_DEVICE=cpu "$PY" -m pytest -q -p no:cacheprovider --collect-only -m device tests/test_safety.py
}
check_pipeline() {
    real "$PY" "${PIPELINE[@]}" "${SMALL[@]}" --override ppo:fuse_roles=false &&
        tiny "$PY" "${PIPELINE[@]}" "${SMALL[@]}" --override ppo:fuse_roles=false --dry-run
}
check_ppo_fused() {
    real "$PY" "${PIPELINE[@]}" --only ppo --override ppo:total_episodes=256 --override ppo:fuse_roles=true &&
        tiny "$PY" "${PIPELINE[@]}" --only ppo --override ppo:total_episodes=256 --override ppo:fuse_roles=true --dry-run
}
check_entries() {
    real "$PY" -c "$ENTRIES" "$REG" && tiny "$PY" -c "$ENTRIES" "$REG" --dry-run
}
check_bench_gpt2() {
    real "$PY" scripts/bench_ppo.py "${BENCH[@]}" && real "$PY" -c "$BENCH_OK" "$WORK/bench.json" &&
        tiny "$PY" -c "$BENCH_ARGS" "${BENCH[@]}"
}

NAMES=() STATUS=() SECONDS_TAKEN=() FAILED=()
run_check() {  # NAME: run check_NAME (dashes as underscores), its output in WORK/logs/NAME.log
    local name=$1 log="$WORK/logs/$1.log" t0 rc status
    if (($(remaining) <= 0)); then
        NAMES+=("$name") STATUS+=("not run: budget spent") SECONDS_TAKEN+=("0.0") FAILED+=("$name")
        return
    fi
    ((DRY)) && echo "$name:" || echo "gpu_check: $name (log $log)" >&2
    t0=$(date +%s.%N)
    "check_${name//-/_}" 3>&1 >"$log" 2>&1
    rc=$?
    case $rc in
        0) status=$( ((DRY)) && echo "dry-run ok" || echo "ok") ;;
        124 | 137) status="TIMEOUT" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    if ((rc)); then
        FAILED+=("$name")
        echo "gpu_check: $name failed; the end of $log:" >&2
        tail -n 15 "$log" | sed 's/^/    /' >&2
    fi
    NAMES+=("$name") STATUS+=("$status")
    SECONDS_TAKEN+=("$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')")
}

# CUDA asked for and none there: one line, exit 1, nothing run.
if ((!DRY)); then
    if ! why=$("$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else f"torch {torch.__version__}: torch.cuda.is_available() is False")' 2>&1); then
        echo "gpu_check: FAILED: CUDA requested but none is available (${why##*$'\n'}); this check needs a GPU and does not skip" >&2
        exit 1
    fi
fi

for check in cuda tests pipeline ppo-fused entries bench-gpt2; do
    run_check "$check"
done

printf '\n%-12s %-24s %8s\n' check status seconds
for i in "${!NAMES[@]}"; do
    printf '%-12s %-24s %8s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
done
total=$(($(date +%s) - START))
if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED: ${FAILED[*]} (${#FAILED[@]} of ${#NAMES[@]} checks; ${total} s; logs in $WORK/logs)" >&2
    exit 1
fi
echo "gpu_check: all ${#NAMES[@]} checks passed$( ((DRY)) && echo " (dry run: plumbing only, nothing ran on a GPU)") in ${total} s; logs in $WORK/logs"
