"""Run every stage on a tiny model of each architecture family users bring, and print family × stage.

    python scripts/arch_matrix.py --json matrix.json                   # every family, every stage
    python scripts/arch_matrix.py --families qwen2,gemma2 --stages sft_lora,sft_qlora
    python scripts/arch_matrix.py --families qwen2 --configs configs/qwen2.5-0.5b   # stages 01-03 from those YAMLs

Each family (rlhf/testing/arch.py: Llama 3, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, OPT, GPT-NeoX) is a
randomly initialised 2-layer model of its transformers config class with a tokenizer made here that carries the
family's special tokens and chat template. Stages run through their real command lines, one registry per family:
01 (lora, qlora), 02 (qlora), 03 in 4-bit (fuse_roles on, off), 04, and scripts/chat.py --prompt. The table says
pass/FAIL and seconds per stage; `--json OUT` writes
`{"families": {"<family>": {"<stage>": {"ok": bool, "seconds": float, "error": str|null}}}}`.
Exit status 1 when any stage failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.errors import ConfigError, run_cli  # noqa: E402
from rlhf.testing.arch import FAMILIES, MATRIX_STAGES, StageResult, run_family  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated (default: all: "
                                                                      f"{','.join(FAMILIES)})")
    parser.add_argument("--stages", default=",".join(MATRIX_STAGES), help="comma-separated, in pipeline order "
                                                                          "(default: all)")
    parser.add_argument("--configs", help="a configs/<model>/ folder whose sft/reward/ppo YAMLs stages 01-03 run")
    parser.add_argument("--workdir", help="keep models, data and registries here (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    args.stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [f for f in args.families if f not in FAMILIES] + [s for s in args.stages if s not in MATRIX_STAGES]
    if unknown:
        raise ConfigError(f"unknown family or stage {', '.join(unknown)}; families: {', '.join(FAMILIES)}; "
                          f"stages: {', '.join(MATRIX_STAGES)}")
    return args


def table(results: dict[str, dict[str, StageResult]], stages: tuple[str, ...]) -> str:
    """A markdown table: one row per family, one column per stage, `pass 12.3s` or `FAIL 4.5s`."""
    lines = ["| family | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for family, by_stage in results.items():
        cells = [f"{'pass' if r.ok else 'FAIL'} {r.seconds:.1f}s" for r in (by_stage[s] for s in stages)]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict[str, StageResult]] = {}
    with tempfile.TemporaryDirectory(prefix="arch-matrix-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        for family in args.families:
            results[family] = run_family(family, root / family, ROOT, configs=args.configs, stages=args.stages)
            failed = {s: r.error for s, r in results[family].items() if not r.ok}
            status = "ok" if not failed else "; ".join(f"{s}: {e}" for s, e in failed.items())
            print(f"[arch] {family}: {status}", file=sys.stderr, flush=True)
    print(table(results, args.stages))
    if args.json:
        out = {"families": {f: {s: r.as_json() for s, r in by.items()} for f, by in results.items()}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 1 if any(not r.ok for by in results.values() for r in by.values()) else 0


if __name__ == "__main__":
    def _main() -> None:
        raise SystemExit(main())

    run_cli(_main)
