"""A quiet console (rlhf/console.py): the known library warnings that say nothing actionable are hidden where they
arise and everything else still shows; in a run of several processes only process 0 prints start-up lines and
progress bars; `--verbose` shows it all.

Each check that installs the filters runs in a fresh Python process: they are process-wide (warnings filters,
logger filters, environment), and this one is pytest's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, run_script

# A line of a Python warning as Python prints it: `path:line: SomeWarning: message` and the source line below it
# (`  warnings.warn(`). No line of a quiet run may match.
WARNING_LINE = re.compile(r"Warning\b|warnings\.warn")


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING_LINE.search(line)]


def test_every_known_message_says_why_it_is_hidden():
    from rlhf.console import NOISE

    assert NOISE
    for noise in NOISE:
        assert noise.kind in ("warning", "log"), noise
        assert len(noise.reason) > 40, f"{noise.source}: say why it is safe to hide"
        re.compile(noise.message)
        assert issubclass(noise.category, Warning)


def test_importing_rlhf_console_imports_no_heavy_library():
    res = run_script("-c", "import sys, rlhf.console; "
                           "print(sorted({'torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'datasets'} "
                           "& set(sys.modules)))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


_EMIT = textwrap.dedent("""
    import logging, sys, warnings
    from rlhf import console
    console.install(verbose=sys.argv[1] == "verbose")

    def warn(message, category, module):  # as if raised in that module
        warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module)

    # Known: hidden.
    warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
         UserWarning, "peft.tuners.lora.layer")
    warn("`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
         FutureWarning, "transformers.training_args")
    warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
         "instead.", FutureWarning, "transformers.modeling_utils")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError("No module named 'kernels'"))
    logging.getLogger("transformers.modeling_utils").warning(
        "`loss_type=None` was set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`.")
    logging.getLogger("transformers.trainer_utils").warning(
        "mtime may not be reliable on this filesystem, falling back to numerical ordering")

    # Look alike, but not known: shown.
    warn("`gradient_checkpointing_kwargs` is deprecated and will be removed in v6. Use "
         "`activation_checkpointing_kwargs` instead.", FutureWarning, "transformers.training_args")
    warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.",
         UserWarning, "some.other.module")
    warn("a warning nobody listed", UserWarning, "peft.tuners.lora.layer")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", ImportError("kernels is broken"))
    logging.getLogger("transformers.modeling_utils").warning(
        "`loss_type=Focal` was set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`.")
    logging.getLogger("rlhf.safety").warning("our own warning")
""")

_HIDDEN = ("layer.py:1: UserWarning: fan_in_fan_out", "`gradient_checkpointing` is deprecated",
           "`is_gradient_checkpointing`", "No module named 'kernels'", "`loss_type=None`", "mtime may not be reliable")
_SHOWN = ("`gradient_checkpointing_kwargs` is deprecated", "module.py:1: UserWarning: fan_in_fan_out",
          "layer.py:1: UserWarning: a warning nobody listed", "kernels is broken", "`loss_type=Focal`", "our own warning")


def test_known_messages_are_hidden_and_everything_else_shows():
    res = run_script("-c", _EMIT, "quiet")
    assert res.returncode == 0, res.stderr
    for text in _HIDDEN:
        assert text not in res.stderr, f"{text!r} shown:\n{res.stderr}"
    for text in _SHOWN:
        assert text in res.stderr, f"{text!r} hidden:\n{res.stderr}"


def test_verbose_shows_every_message():
    res = run_script("-c", _EMIT, "verbose")
    assert res.returncode == 0, res.stderr
    for text in (*_HIDDEN, *_SHOWN):
        assert text in res.stderr, f"{text!r} hidden with --verbose:\n{res.stderr}"


def test_a_reward_model_load_report_is_hidden_only_when_the_new_score_head_is_all_it_reports(tmp_path):
    """Stage 02 loads a language model as a sequence classifier: transformers reports the score head as missing.
    The real report, from transformers itself, is hidden; one that also misses another key is shown whole."""
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from rlhf import console
        console.install()
        from safetensors.torch import load_file, save_file
        from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

        lm = Path(sys.argv[1])
        GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
                                   eos_token_id=0)).save_pretrained(lm)
        print("--- score head only", file=sys.stderr, flush=True)
        GPT2ForSequenceClassification.from_pretrained(lm, num_labels=1)
        weights = load_file(lm / "model.safetensors")
        weights.pop("transformer.h.0.ln_1.weight")
        save_file(weights, lm / "model.safetensors", metadata={"format": "pt"})
        print("--- and another key", file=sys.stderr, flush=True)
        GPT2ForSequenceClassification.from_pretrained(lm, num_labels=1)
    """)
    res = run_script("-c", code, str(tmp_path / "lm"), env={"HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    score_only, another_key = res.stderr.split("--- score head only")[1].split("--- and another key")
    assert "LOAD REPORT" not in score_only, score_only
    assert "LOAD REPORT" in another_key and "score.weight" in another_key, another_key
    assert "transformer.h.0.ln_1.weight | MISSING" in another_key, another_key


def test_log_prints_on_process_0_only_and_with_verbose_on_every_process_prefixed_by_its_rank(monkeypatch, capsys):
    from rlhf import console
    from rlhf.stage import log

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(console._state, "verbose", False)
    log("[ppo] start")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    log("[ppo] start")
    assert capsys.readouterr().err == "[ppo] start\n"
    monkeypatch.setitem(console._state, "verbose", True)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        log("[ppo] two\n[ppo] lines")
        assert capsys.readouterr().err == f"[rank {rank}] [ppo] two\n[rank {rank}] [ppo] lines\n"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    log("[ppo] one process")
    assert capsys.readouterr().err == "[ppo] one process\n"


def test_verbose_is_a_stage_option_that_changes_neither_the_run_key_nor_the_entry(tmp_path):
    from rlhf.config import StageConfig, load_config, parse_config, public_config

    assert parse_config(StageConfig, ["--verbose"]).verbose is True
    (tmp_path / "c.yaml").write_text("verbose: true\n")
    cfg = load_config(StageConfig, tmp_path / "c.yaml")
    assert cfg.verbose is True
    assert cfg.fingerprint() == StageConfig().fingerprint()
    assert "verbose" not in public_config(cfg)


# ---------------------------------------------------------------- through the command lines


def _lora_sft(registry: Path, data: dict[str, Path], *extra: str) -> subprocess.CompletedProcess:
    # LoRA on the tiny GPT-2: peft's fan_in_fan_out UserWarning (Conv1D), transformers' gradient_checkpointing
    # FutureWarnings, and bitsandbytes' import-time note on CPUs with AVX512-BF16.
    return run_script("stages/01_sft.py", "--registry", str(registry), "--data", str(data["sft"]),
                      "--eval_data", str(data["sft_eval"]), "--mode", "lora", "--lora_r", "4", "--max_steps", "1",
                      "--gen_eval_samples", "0", *extra)


@pytest.mark.slow
def test_a_stage_run_prints_no_warning_lines_and_verbose_shows_the_hidden_ones(pretrained_registry, tiny_data,
                                                                                 tmp_path):
    reg = tmp_path / "runs"
    shutil.copytree(pretrained_registry, reg)
    quiet = _lora_sft(reg, tiny_data)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert _warning_lines(quiet.stderr) == [], quiet.stderr[-3000:]
    assert "kernels-community" not in quiet.stderr
    assert "[sft] registered sft:" in quiet.stderr  # our own lines still show

    verbose = _lora_sft(reg, tiny_data, "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "UserWarning: fan_in_fan_out is set to False" in verbose.stderr, verbose.stderr[-3000:]
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in verbose.stderr, verbose.stderr[-3000:]
    assert "[sft] registered sft:" in verbose.stderr


# One PPO step: 4 rows per micro-batch x 2 minibatches on each of 2 processes = 16 episodes.
TINY_PPO_2 = ["--total_episodes", "16", "--per_device_train_batch_size", "4", "--num_mini_batches", "2",
              "--num_ppo_epochs", "1", "--response_length", "8", "--max_prompt_length", "32",
              "--toxicity", "profanity-check", "--learning_rate", "5e-3", "--lora_r", "4", "--save_steps", "1000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_process_ppo_run_prints_its_start_up_lines_once(rlhf_registry, tiny_data, tmp_path):
    """The two ranks launched as torchrun launches them (as in tests/test_ppo_interrupt.py), 4-bit base: every
    `[ppo]` line appears once in the two ranks' stderr together, rank 1 shows no progress bar, neither shows a
    Python warning."""
    reg = tmp_path / "runs"
    shutil.copytree(rlhf_registry, reg)
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        with (tmp_path / f"rank{rank}.err").open("w") as err:
            procs.append(subprocess.Popen([sys.executable, "stages/03_ppo.py", "--registry", str(reg), "--data",
                                           str(tiny_data["prompts"]), *TINY_PPO_2],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
    deadline = time.time() + 300
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    errs = [(tmp_path / f"rank{rank}.err").read_text(errors="replace") for rank in range(2)]
    assert codes == [0, 0], "\n".join(f"rank {i} exited {c}:\n{e[-3000:]}" for i, (c, e) in enumerate(zip(codes, errs)))

    lines = Counter(line for e in errs for line in e.replace("\r", "\n").splitlines() if line.startswith("[ppo]"))
    assert any(line.startswith("[ppo] gae: one base (4-bit NF4)") for line in lines), errs[0][-3000:]
    assert any(line.startswith("[ppo] registered ppo:") for line in lines), errs[0][-3000:]
    assert {line: n for line, n in lines.items() if n != 1} == {}, "printed by both ranks"
    assert "[ppo]" not in errs[1] and "it/s" not in errs[1], f"rank 1 printed start-up lines or progress:\n{errs[1]}"
    for i, e in enumerate(errs):
        assert _warning_lines(e) == [], f"rank {i}:\n{e[-3000:]}"
