"""Check data files against the pipeline's schemas before training on them.

    python scripts/validate_data.py --schema dialogue data/demo/sft.jsonl
    python scripts/validate_data.py --schema preference --adapter hh-rlhf hh_train.jsonl

Prints `ok: FILE (N records)` for each valid file and exits 0; otherwise prints one
`FILE:LINE: field: got X, expected Y` line per problem (at most --max-problems per
file, then `... and N more problems`) and exits 1. Formats: data_schemas/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from rlhf.data import check_file  # noqa: E402
from rlhf.data_formats import ADAPTERS, SCHEMAS  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", required=True, choices=SCHEMAS, help="the format every record must match")
    parser.add_argument("--max-problems", type=positive_int, default=20, help="problems printed per file (default 20)")
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), help="convert raw records first (e.g. hh-rlhf)")
    parser.add_argument("files", nargs="+", metavar="FILE", help=".jsonl, .json (array) or .parquet files")
    args = parser.parse_args(argv)

    all_valid = True
    for path in args.files:
        try:
            report = check_file(path, args.schema, adapter=args.adapter, max_problems=args.max_problems)
        except Exception as exc:  # a bug in the checker must still not show the user a traceback
            print(f"{path}: cannot validate ({type(exc).__name__}: {exc})")
            all_valid = False
            continue
        if report.problems:
            all_valid = False
            print("\n".join(report.problems))
        else:
            noun = "record" if report.records == 1 else "records"
            print(f"ok: {path} ({report.records} {noun})")
    return 0 if all_valid else 1


if __name__ == "__main__":
    from rlhf import console  # quiet console: known library warnings that say nothing actionable are hidden

    console.install()
    # Problem lines quote the data; never fail on a terminal that cannot show it.
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
