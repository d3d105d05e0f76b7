"""Download what an offline run needs, on a machine with internet access.

    python scripts/fetch_assets.py [--detoxify original ...] [--config configs/x/ppo.yaml ...] [--dry-run]

- `--detoxify NAME...`: detoxify checkpoints, through torch.hub into its cache (`<torch hub dir>/checkpoints`,
  where `Detoxify` and `load_scorer("auto")` look), plus the config and tokenizer files of each checkpoint's
  base architecture (e.g. `bert-base-uncased`) into the Hugging Face cache.
- `--config FILE...`: the hub models and datasets a YAML config names: fields ending in `model` or
  `model_name_or_path` (models; a `detoxify:NAME` scorer spec there fetches that checkpoint), `dataset` or
  `_data` (datasets), whose value is a hub id rather than a local path or a registry reference.

Afterwards, run offline with `HF_HUB_OFFLINE=1` so the libraries read their caches without trying the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.errors import ConfigError, fail, run_cli  # noqa: E402
from rlhf.hub import is_hub_id  # noqa: E402
from rlhf.safety import DETOXIFY_MODELS  # noqa: E402

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".txt", ".yaml", ".yml", ".ckpt", ".pt", ".safetensors")
# config and tokenizer files only; the checkpoint brings the weights
TOKENIZER_FILES = ["*.json", "*.txt", "*.model"]


def kind_of(key: str) -> str | None:
    if key.endswith(("model", "model_name_or_path")):
        return "model"
    if key.endswith(("dataset", "_data")):
        return "dataset"
    return None


def walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, str(k))
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)
    else:
        yield key, node


def assets_in_config(path: Path) -> list[tuple[str, str]]:
    """(kind, name) pairs: kind is `model`, `dataset` or `detoxify`."""
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML: {exc}") from exc
    found = []
    for key, value in walk(cfg):
        kind = kind_of(key)
        if kind is None or not isinstance(value, str):
            continue
        if value.startswith(("detoxify:", "auto:")) and value.split(":", 1)[1] in DETOXIFY_MODELS:
            found.append(("detoxify", value.split(":", 1)[1]))
        elif is_hub_id(value) and not value.endswith(LOCAL_SUFFIXES) and not Path(value).exists():
            found.append((kind, value))
    return found


def fetch_detoxify(name: str) -> str:
    import torch
    from detoxify.detoxify import MODEL_URLS
    from huggingface_hub import snapshot_download

    # weights_only=False as detoxify does for its own released checkpoints
    loaded = torch.hub.load_state_dict_from_url(MODEL_URLS[name], map_location="cpu", weights_only=False)
    base = loaded["config"]["arch"]["args"]["model_type"]
    snapshot_download(base, allow_patterns=TOKENIZER_FILES)
    return f"detoxify:{name} checkpoint in {torch.hub.get_dir()}/checkpoints, {base} config+tokenizer in the HF cache"


def fetch_hub(kind: str, name: str) -> str:
    from huggingface_hub import snapshot_download

    return f"{kind} {name} -> {snapshot_download(name, repo_type=kind)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detoxify", nargs="*", default=[], choices=DETOXIFY_MODELS, help="detoxify checkpoints")
    parser.add_argument("--config", nargs="*", default=[], type=Path, help="YAML configs whose hub ids to fetch")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched, download nothing")
    args = parser.parse_args(argv)

    assets = [("detoxify", n) for n in args.detoxify]
    for path in args.config:
        assets += assets_in_config(path)
    assets = list(dict.fromkeys(assets))
    if not assets:
        fail("nothing to fetch: pass --detoxify NAME and/or --config FILE", 2)
    failed = []
    for kind, name in assets:
        if args.dry_run:
            print(f"{kind}\t{name}")
            continue
        try:
            print(fetch_detoxify(name) if kind == "detoxify" else fetch_hub(kind, name))
        except Exception as exc:  # network, auth, missing repo: report each and go on
            print(f"failed: {kind} {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(name)
    if failed:
        fail(f"could not download {', '.join(failed)}; this script needs internet access to GitHub and the hub", 1)


if __name__ == "__main__":
    from rlhf import console  # quiet console: known library warnings that say nothing actionable are hidden

    console.install()
    run_cli(main)
