"""Inspect and check the checkpoint registry.

    python scripts/registry.py list    [--registry runs] [--stage sft] [--json]
    python scripts/registry.py show    REF [--json]
    python scripts/registry.py lineage REF [--json]
    python scripts/registry.py verify  [--json]      # exit 1 naming each bad entry and file
    python scripts/registry.py cleanup                # remove folders no row points at

REF is `stage:latest`, `stage:<id>` or `<id>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.errors import run_cli  # noqa: E402
from rlhf.registry import Entry, Registry  # noqa: E402


def _line(e: Entry) -> str:
    metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(e.metrics.items())[:4])
    parents = ",".join(e.parents) or "-"
    return f"{e.ref:<34} {e.created_at}  parents={parents}  {metrics}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "show", "lineage", "verify", "cleanup"])
    parser.add_argument("ref", nargs="?", help="entry reference for show/lineage")
    parser.add_argument("--registry", default="runs", help="registry folder (default: runs)")
    parser.add_argument("--stage", help="list: only this stage")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()

    reg = Registry(args.registry, create=args.command != "verify" or Path(args.registry).exists())
    if args.command in ("show", "lineage") and not args.ref:
        parser.error(f"{args.command} needs a REF (e.g. sft:latest)")

    if args.command == "list":
        entries = reg.entries(args.stage)
        if args.json:
            print(json.dumps([e.to_json() for e in entries], indent=2))
        else:
            print("\n".join(_line(e) for e in entries) or f"(no entries in {reg.root})")
    elif args.command == "show":
        print(json.dumps(reg.get(args.ref, verify=False).to_json(), indent=2))
    elif args.command == "lineage":
        chain = reg.lineage(args.ref)
        if args.json:
            print(json.dumps([e.to_json() for e in chain], indent=2))
        else:
            print("\n".join(("  " * i) + _line(e) for i, e in enumerate(chain)))
    elif args.command == "verify":
        bad = reg.verify()
        if args.json:
            print(json.dumps(bad, indent=2))
        else:
            for ref, problems in bad.items():
                for p in problems:
                    print(f"{ref}: {p}")
            n = len(reg.entries())
            print(f"verified {n} entries: {n - len(bad)} ok, {len(bad)} bad", file=sys.stderr)
        if bad:
            raise SystemExit(1)
    elif args.command == "cleanup":
        for path in reg.cleanup():
            print(f"removed {path}")


if __name__ == "__main__":
    from rlhf import console  # quiet console: known library warnings that say nothing actionable are hidden

    console.install()
    run_cli(main)
