"""Stage configs: one dataclass per stage, loaded from YAML with command-line overrides.

    python stages/01_sft.py --config configs/demo/sft.yaml --learning_rate 1e-4 --resume

Precedence: dataclass defaults < YAML file < command line (TRL's `TrlParser`
convention). Every field carries its help text in `field(metadata={"help": ...})`,
shown by `--help`. An unknown YAML key or a value of the wrong type is a
`ConfigError` naming the file, line and field; cross-field rules live in each
config's `validate()` method and are checked once, after parsing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rlhf.errors import ConfigError

C = TypeVar("C")

# Keys never written to the registry or logs, whatever the config calls them.
_SECRET_WORDS = ("token", "secret", "password", "api_key")
# How a run is driven, not what it trains: left out of the run's key and of the entry's recorded config (an
# absolute registry folder would tie a moved or shared registry to one machine).
RUN_FLAGS = ("registry", "resume", "reuse", "verbose")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class StageConfig:
    """Fields every stage has."""

    registry: str = _help("Registry folder: registry.db plus artifacts under <registry>/<stage>/<id>/.", default="runs")
    seed: int = _help("Random seed for data order, initialization and sampling.", default=0)
    resume: bool = _help(
        "Continue the last interrupted run of this stage with the same config from its last checkpoint.",
        default=False,
    )
    reuse: bool = _help(
        "Return the registered entry with the same config and inputs instead of training again "
        "(scripts/run_pipeline.py passes it unless --force).",
        default=False,
    )
    verbose: bool = _help(
        "Show every warning, including the known ones that say nothing actionable (rlhf.console lists them and "
        "why), and in a run of several processes every process's start-up lines, prefixed by its rank.",
        default=False,
    )
    on_invalid: str = _help(
        "Invalid data records: 'error' refuses the source naming each problem (FILE:LINE); 'skip' trains on the "
        "valid ones, logs how many were dropped and why, and records the count in the entry.", default="error")

    def validate(self) -> None:
        """Cross-field checks; subclasses extend it (calling this one) and raise ConfigError."""
        from rlhf.data import ON_INVALID

        if self.on_invalid not in ON_INVALID:
            raise ConfigError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {self.on_invalid!r}")

    def require(self, *names: str) -> None:
        """Fields the stage cannot run without (no default names anyone's data)."""
        for name in names:
            if not getattr(self, name):
                raise ConfigError(f"{name}: not set; give it in the config file ({name}: ...) or as --{name} "
                                  f"({type(self).__doc__.strip().splitlines()[0]})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the fields that change what is trained (not how the run is driven)."""
        data = {k: v for k, v in self.to_dict().items() if k not in RUN_FLAGS}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


MODES = ("full", "lora", "qlora")


@dataclass
class TrainerStageConfig(StageConfig):
    """Fields of the stages trained with a Trainer on a starting model (01 SFT, 02 reward)."""

    model: str = _help("Starting model: registry ref, local folder or hub id.", default="sft:latest")
    mode: str = _help("full | lora | qlora (LoRA on a 4-bit NF4 base).", default="full")
    lora_r: int = _help("LoRA rank.", default=16)
    lora_alpha: int = _help("LoRA alpha (scale = alpha / r).", default=32)
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    lora_target_modules: str = _help("Modules LoRA wraps: 'all-linear' or a comma-separated list.", default="all-linear")
    max_length: int = _help("Longest tokenized example, in tokens.", default=256)
    num_train_epochs: float = _help("Passes over the data (ignored when max_steps > 0).", default=1.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1: use num_train_epochs).", default=-1)
    per_device_train_batch_size: int = _help("Examples per device per micro-batch.", default=16)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass (less memory, slower).", default=True)
    learning_rate: float = _help("Peak learning rate (cosine schedule).", default=2e-5)
    warmup_ratio: float = _help("Share of steps spent warming up.", default=0.03)
    logging_steps: int = _help("Log every N steps (progress bar, TensorBoard).", default=10)
    save_steps: int = _help("Write a resumable checkpoint every N steps.", default=100)
    trust_remote_code: bool = _help("Allow model code from the hub (only for models you trust).", default=False)
    data: str = _help("Training data: .jsonl/.json/.parquet file or hub dataset id.", default="")
    data_split: str = _help("Split to read when `data` is a hub dataset.", default="train")
    eval_data: str = _help("Held-out data (file or hub id). Unset: a seeded `eval_fraction` of `data` is held out "
                           "instead (logged, and recorded in the entry).", default="")
    eval_split: str = _help("Split to read when `eval_data` is a hub dataset.", default="test")
    eval_fraction: float = _help("Without eval_data: share of `data` held out for evaluation (at least 8 and at most "
                                 "1000 records, never more than half).", default=0.05)

    def validate(self) -> None:
        super().validate()
        self.require("data")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_positive(self, "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                       "max_length", "lora_r", "logging_steps", "save_steps")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def public_config(cfg: Any) -> dict[str, Any]:
    """The config as stored in the registry: secrets and run flags (`RUN_FLAGS`) left out."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in RUN_FLAGS and not any(w in k.lower() for w in _SECRET_WORDS)}


def check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None or value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value!r}")


# ---------------------------------------------------------------------------- parsing


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `T`, `T | None`, `Optional[T]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field type; raise ConfigError naming `where`."""
    inner, optional = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{where}: got null, expected {getattr(inner, '__name__', inner)}")
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: got {value!r}, expected a list")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or inner is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(f"{where}: got {value!r}, expected a mapping (JSON on the command line)") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: got {value!r}, expected a mapping")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: got {value!r}, expected true or false")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: got {value!r}, expected an integer") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where}: got {value!r}, expected an integer")
        return int(as_float)
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: got {value!r}, expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: got {value!r}, expected a number") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: got {value!r}, expected a string")
        return str(value)
    return value


def _yaml_with_lines(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}:{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or node is None or not hasattr(node, "value"):
        raise ConfigError(f"{path}:1: expected a mapping of field: value at the top level")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    return data, lines


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build `cls` from a YAML file and a mapping of overrides (both optional), then validate it."""
    fields = _fields(cls)
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data, lines = _yaml_with_lines(path)
        for key, value in data.items():
            where = f"{path}:{lines.get(key, '?')}: field '{key}'"
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise ConfigError(f"{path}:{lines.get(key, '?')}: unknown field '{key}' for {cls.__name__} (known: {known})")
            values[key] = _coerce(value, fields[key].type, where)
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown option --{key} for {cls.__name__}")
        values[key] = _coerce(value, fields[key].type, f"--{key}")
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def parse_config(cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    """`--config FILE` plus `--field value` for every field of `cls` (see module docstring)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().splitlines()[0],
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file of field: value pairs; command-line options override it.")
    fields = _fields(cls)
    for name, f in fields.items():
        inner, _ = _base_type(f.type)
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        elif f.default_factory is not dataclasses.MISSING:
            help_text += f" (default: {f.default_factory()})"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if inner is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(f"--{name}", **kwargs)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    path = args.pop("config", None)
    return load_config(cls, path, args)
