"""Run the whole pipeline: demo data, then stages 00 -> 04, each through its own command line.

    python scripts/run_pipeline.py --config configs/demo/pipeline.yaml [--force] [--only sft,reward]
        [--override ppo:total_episodes=256 ...] [--dry-run]

Each stage runs as `python stages/0N_*.py --config <its yaml> --registry R --seed S --reuse`,
so a stage whose config and inputs are unchanged returns its registered entry instead of
training again; `--force` drops `--reuse`; `--verbose` is passed on to every stage (all warnings, rlhf.console).
`--override STAGE:FIELD=VALUE` appends `--FIELD VALUE` to that stage's command line (the stage checks it);
`--dry-run` prints every command and runs none.
Stages whose script or config is not there are skipped with a note. A failing stage stops the pipeline with its
exit code.

The keys of `stages` name runs (`STAGE_SCRIPTS`): `ppo`, `ppo_tox0`, `grpo` and `rloo` all run stages/03_ppo.py,
each with its own config, named after its key (configs/demo/ppo_tox0.yaml). configs/demo/pipeline.yaml is
`make demo`; configs/demo/experiment.yaml runs the same and adds the runs that do not fit in the demo's time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf import console  # noqa: E402
from rlhf.errors import ConfigError, run_cli  # noqa: E402

STAGE_SCRIPTS = {
    "pretrain": "stages/00_pretrain.py",
    "sft": "stages/01_sft.py",
    "reward": "stages/02_reward.py",
    "ppo": "stages/03_ppo.py",
    "ppo_tox0": "stages/03_ppo.py",  # stage 03 without the toxicity term (toxicity_coef 0; stage 04 labels it ppo-tox0)
    "dpo": "stages/03_dpo.py",
    "grpo": "stages/03_ppo.py",  # stage 03 with advantage_estimator: grpo (registered as a ppo entry)
    "rloo": "stages/03_ppo.py",  # ... with advantage_estimator: rloo
    "compare": "stages/04_compare.py",
}


def load_pipeline(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline config not found") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("stages"), dict):
        raise ConfigError(f"{path}: expected a mapping with a 'stages' mapping of stage: config file")
    unknown = set(cfg["stages"]) - set(STAGE_SCRIPTS)
    if unknown:
        raise ConfigError(f"{path}: unknown stage(s) {sorted(unknown)}; known: {', '.join(STAGE_SCRIPTS)}")
    return cfg


def stage_overrides(specs: list[str], stages: dict) -> dict[str, list[str]]:
    """`["ppo:fuse_roles=true", ...]` -> `{"ppo": ["--fuse_roles", "true"], ...}`, for stages of the config."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        stage, _, assignment = spec.partition(":")
        name, eq, value = assignment.partition("=")
        if not (stage and name and eq):
            raise ConfigError(f"--override {spec!r}: expected STAGE:FIELD=VALUE, e.g. ppo:fuse_roles=true")
        if stage not in stages:
            raise ConfigError(f"--override {spec!r}: no stage {stage!r} in the config; it has {', '.join(stages)}")
        out.setdefault(stage, []).extend([f"--{name}", value])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo/pipeline.yaml")
    parser.add_argument("--force", action="store_true", help="retrain every stage even when an identical entry exists")
    parser.add_argument("--only", help="comma-separated stages to run (default: all in the config)")
    parser.add_argument("--registry", help="override the registry folder of the config")
    parser.add_argument("--verbose", action="store_true",
                        help="every stage shows all warnings, also the known ones that say nothing actionable")
    parser.add_argument("--override", action="append", default=[], metavar="STAGE:FIELD=VALUE",
                        help="pass --FIELD VALUE to STAGE (repeatable), e.g. ppo:fuse_roles=true")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    args = parser.parse_args()
    console.install(verbose=args.verbose)  # this process's own; each stage installs its own, with --verbose passed on

    cfg = load_pipeline(Path(args.config))
    overrides = stage_overrides(args.override, cfg["stages"])
    registry = args.registry or cfg.get("registry", "runs")
    seed = str(cfg.get("seed", 0))
    only = set(args.only.split(",")) if args.only else None
    started = time.time()
    timings: dict[str, float] = {}
    env = dict(os.environ)
    if cfg.get("threads"):
        # Tiny models run fastest on one thread per process; real models want the default (all cores).
        env.setdefault("OMP_NUM_THREADS", str(cfg["threads"]))
        env.setdefault("MKL_NUM_THREADS", str(cfg["threads"]))

    data = cfg.get("data")
    if data and (only is None or "data" in only):
        t0 = time.time()
        cmd = [sys.executable, "scripts/make_demo_data.py", "--out", str(data.get("out", "data/demo")), "--seed", seed]
        print(f"\n=== data: {' '.join(cmd[1:])}", flush=True)
        rc = 0 if args.dry_run else subprocess.call(cmd, cwd=ROOT, env=env)
        if rc:
            raise SystemExit(rc)
        timings["data"] = time.time() - t0

    for stage, stage_cfg in cfg["stages"].items():
        if only is not None and stage not in only:
            continue
        script = ROOT / STAGE_SCRIPTS[stage]
        if not script.exists() or not (ROOT / stage_cfg).exists():
            print(f"\n=== {stage}: skipped ({script.name if not script.exists() else stage_cfg} not present yet)")
            continue
        cmd = [sys.executable, str(script), "--config", stage_cfg, "--registry", registry, "--seed", seed]
        if not args.force:
            cmd.append("--reuse")
        if args.verbose:
            cmd.append("--verbose")
        cmd += overrides.get(stage, [])
        print(f"\n=== {stage}: {' '.join(cmd[1:])}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        timings[stage] = time.time() - t0
        if rc:
            print(f"pipeline stopped: stage {stage} exited with {rc}", file=sys.stderr)
            raise SystemExit(rc)

    if args.dry_run:
        return
    total = time.time() - started
    print("\n=== done in {:.0f}s ({})".format(total, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())))
    print(f"registry: {registry}  (python scripts/registry.py list --registry {registry})")
    report = Path(registry) / "report" / "report.md"
    if report.exists():
        print(f"report: {report}\n")
        text = report.read_text()
        table = text.split("\n\n")[1] if "\n\n" in text else text
        print(table)


if __name__ == "__main__":
    run_cli(main)
