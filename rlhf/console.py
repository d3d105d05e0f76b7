"""A quiet console: what a stage or script prints on stderr, and what it leaves out.

Shown: our own lines (`[sft] ...`, `rlhf.stage.log`), progress bars, errors, and every warning of Python or of a
library logger except the known ones in `NOISE`. Each of those says nothing a user can act on (the project causes
it: our code calls a library in the way it must, or a library reports a choice it made correctly on its own), and
each entry says why it is safe to hide. A warning not in the list still shows.

In a run of several processes (torchrun / accelerate launch: `RANK` and `WORLD_SIZE` set), only process 0 prints
start-up lines and progress bars: `log` checks the rank, and the other processes turn the Hugging Face progress
bars off and keep our own logged warnings to themselves (process 0 says the same). Errors (`run_cli`'s one-liners)
print on every process that hits them.

`--verbose` (every stage; `verbose: true` in YAML) installs no filter: every warning shows, Python's
once-per-location default included for DeprecationWarning, and every process prints its start-up lines,
each prefixed with its rank, e.g. `[rank 1] [ppo] ...`.

`install` runs once per process, from each entry point, before the heavy imports (a filter added after a
library's import-time message is too late for it). Importing this module imports only the standard library.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Noise:
    """One known message to hide. `kind` "warning": a Python warning (`warnings.warn`) of `category` raised in
    module `source`; "log": a record of the library logger named `source`. `message` is a regular expression the
    message must match from its start (logged messages with their terminal colors removed; `\\Z` anchors the end)."""

    kind: str
    source: str
    message: str
    reason: str
    category: type[Warning] = Warning


NOISE: tuple[Noise, ...] = (
    Noise("warning", "peft.tuners.lora.layer", category=UserWarning,
          message=r"fan_in_fan_out is set to False but the target module is `Conv1D`\. Setting fan_in_fan_out to True",
          reason="GPT-2 stores its linear layers as Conv1D (weights transposed); peft notices and sets "
                 "fan_in_fan_out itself, which is the right setting. Our LoRA configs target any model, so they "
                 "cannot set it per architecture, and nothing is wrong."),
    Noise("warning", "transformers.training_args", category=FutureWarning,
          message=r"`gradient_checkpointing` is deprecated and will be removed in v6\. Use `activation_checkpointing` "
                  r"instead",
          reason="Our stages pass the TrainingArguments/TRL name `gradient_checkpointing` (from our own config field "
                 "of that name, not deprecated), since transformers 5.0, which we support, has no "
                 "`activation_checkpointing`; transformers maps it to the new name. Only the exact name is hidden: "
                 "`gradient_checkpointing_kwargs` and other deprecations still show."),
    Noise("warning", "transformers.modeling_utils", category=FutureWarning,
          message=r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. Use "
                  r"`is_activation_checkpointing` instead",
          reason="Read by peft/TRL while they wrap the model, never by our code or a config a user writes."),
    Noise("log", "bitsandbytes.backends.cpu.ops",
          message=r"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
          reason="Logged when bitsandbytes is imported on a CPU with AVX512-BF16, by every stage, 4-bit or not: an "
                 "optional faster kernel downloaded from the Hugging Face hub by the `kernels` package, which we do "
                 "not install (runs are offline). bitsandbytes' own CPU kernel is used instead; results are the "
                 "same. Any other failure to load it (the package installed but broken) still shows."),
    Noise("log", "transformers.modeling_utils",
          message=r"`loss_type=None` was set in the config but it is unrecognized\. Using the default loss: "
                  r"`ForCausalLMLoss`",
          reason="Said of any causal LM class whose name does not end in ForCausalLM (GPT2LMHeadModel, stage 00): "
                 "no loss_type is set anywhere and the default is the right loss. A loss_type a config does set "
                 "and transformers does not know still shows."),
    Noise("log", "transformers.modeling_utils",
          message=r"\w+ForSequenceClassification LOAD REPORT from: [^\n]*\n"  # which model, from where
                  r"Key +\| Status[^\n]*\n[-+]+\n"  # the table's header
                  r"(score\.[^|\n]*\| MISSING[ |]*\n)+"  # rows: only keys of the score head, all MISSING
                  r"\s*Notes:\n- MISSING:[^\n]*\Z",  # and no note on another kind of row
          reason="Stage 02 loads a language model as a sequence classifier: the score head is new by design and "
                 "training initializes and trains it. The report is hidden only when the score head is all that is "
                 "missing; any other missing, unexpected or mismatched key still shows the whole report."),
    Noise("log", "transformers.trainer_utils",
          message=r"mtime may not be reliable on this filesystem, falling back to numerical ordering",
          reason="The Trainer sorts checkpoint-N folders by modification time first; tiny runs save several "
                 "within a second, and the numerical order it falls back to is the right one."),
)


class _DropKnown(logging.Filter):
    """On one library logger: drops the records that match one of its `NOISE` entries."""

    def __init__(self, patterns: list[re.Pattern[str]]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = ANSI.sub("", record.getMessage())
        except Exception:  # a malformed record is the logging module's to report, not ours to hide
            return True
        return not any(p.match(message) for p in self.patterns)


_state: dict[str, bool | None] = {"verbose": None}  # None: not installed in this process


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def verbose() -> bool:
    return bool(_state["verbose"])


def install(verbose: bool = False) -> None:
    """Set up this process's console (see the module docstring). Once per process: later calls do nothing."""
    if _state["verbose"] is not None:
        return
    _state["verbose"] = verbose
    if verbose:
        if not sys.warnoptions:  # -W / PYTHONWARNINGS given: the user's choice stands
            warnings.simplefilter("default")
        if world_size() > 1:
            _prefix_warnings_with_rank()
        return
    for noise in NOISE:
        if noise.kind == "warning":
            # Appended: a user's own -W / PYTHONWARNINGS filters come first and win.
            warnings.filterwarnings("ignore", message=noise.message, category=noise.category,
                                    module=re.escape(noise.source) + r"\Z", append=True)
    patterns: dict[str, list[re.Pattern[str]]] = {}
    for noise in NOISE:
        if noise.kind == "log":
            patterns.setdefault(noise.source, []).append(re.compile(noise.message, re.S))
    for name, pats in patterns.items():
        logging.getLogger(name).addFilter(_DropKnown(pats))
    if rank() != 0:
        _quiet_other_rank()


def setup(cfg):
    """`install` for a stage's parsed config (its `verbose` field); returns the config:
    `run_cli(lambda: main(console.setup(parse_config(MyStageConfig))))`."""
    install(verbose=bool(getattr(cfg, "verbose", False)))
    return cfg


def _quiet_other_rank() -> None:
    """A process other than 0: no Hugging Face progress bars (weights loading and saving, dataset maps: process 0
    shows the same ones), and our own logged warnings stay with process 0, which logs the same. A user's own
    setting of the variables wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: the variables are read at import time
        importlib.import_module("transformers.utils.logging").disable_progress_bar()
    if "datasets" in sys.modules:
        importlib.import_module("datasets").disable_progress_bars()
    logging.getLogger("rlhf").setLevel(logging.ERROR)


def _prefix_warnings_with_rank() -> None:
    plain = warnings.formatwarning

    def formatwarning(*args, **kwargs) -> str:
        return with_rank(plain(*args, **kwargs))

    warnings.formatwarning = formatwarning


def with_rank(text: str) -> str:
    """`text` with each line prefixed by `[rank N] ` in a `--verbose` run of several processes; else as is."""
    if not verbose() or world_size() <= 1:
        return text
    prefix = f"[rank {rank()}] "
    return "".join(prefix + line for line in text.splitlines(keepends=True))
