"""Bad input for every stage, through its real command line (issue 8).

Each case runs one stage script as a user would, with one thing wrong, and expects: a non-zero exit, exactly
one error message that names the problem and where (FILE:LINE, the field, the reference), no traceback, no
new registry row, and existing rows and artifacts untouched (`scripts/registry.py list --json` before and
after, then `scripts/registry.py verify`).

Prompts longer than the context are not an error in themselves: PPO and compare keep the last
`max_prompt_length` tokens of a prompt. What differs per stage is a *setting* the model cannot hold:
- 03_ppo refuses `max_prompt_length + response_length` beyond the model's positions before it trains
  (a PPO run silently trained on other lengths than asked is worse than a message); PPO with long
  prompts and lengths that fit runs (the interrupted PPO run of conftest.py uses such prompts);
- 04_compare caps prompts to each model's context and runs (it compares models of any context length,
  so one short-context model must not stop the report; documented in `run_model`).

Not repeated here (covered elsewhere): a broken line and a YAML typo for 00 (test_stage00.py), a wrong-stage
`--model` for 01/02 (test_sft_stage.py, test_reward_stage.py), `sft:latest` as PPO's reward model and a zero
PPO micro-batch (test_ppo_stage.py), a bad prompt line for 04 (test_compare.py).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import TINY_PRETRAIN, run_script
from reliability.conftest import (SUMMARY, TINY_PPO, assert_clean_failure, copy_registry, listing, verify,
                                  write_long_prompts)

pytestmark = pytest.mark.slow

# The kinds of bad input issue 8 lists, in its order.
ISSUE_KINDS = (
    "broken_json", "wrong_types", "missing_fields", "unknown_role", "empty_content", "chosen_equals_rejected",
    "empty_file", "non_utf8", "huge_line", "parquet_wrong_columns", "prompt_too_long", "unknown_ref",
    "wrong_stage_ref", "tokenizer_mismatch", "nonexistent_path", "hub_offline", "unknown_config_field",
    "bad_batch_size",
)
STAGES = {"00": "stages/00_pretrain.py", "01": "stages/01_sft.py", "02": "stages/02_reward.py",
          "03": "stages/03_ppo.py", "04": "stages/04_compare.py"}
# No network, deterministically: the hub "lives" on a closed local port (connection refused).
NO_NETWORK = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
OFFLINE = {"HF_HUB_OFFLINE": "1"}
HUB_SECONDS = 30  # "within seconds": the import of the stage plus one refused connection, never a retry loop


@dataclass
class Ctx:
    """What a case builds its input from: a scratch folder, the tiny data files, a registry copy."""

    tmp: Path
    data: dict[str, Path]
    registry: Path

    def base_args(self, stage: str) -> list[str]:
        """A valid tiny run of `stage`; a case appends what it breaks (a repeated option: the last wins)."""
        d, reg = self.data, str(self.registry)
        return {
            "00": ["--registry", reg, "--data", str(d["text"]), *TINY_PRETRAIN],
            "01": ["--registry", reg, "--model", "pretrain:latest", "--data", str(d["sft"]), "--eval_data",
                   str(d["sft_eval"]), "--max_steps", "1", "--gen_eval_samples", "0"],
            "02": ["--registry", reg, "--model", "pretrain:latest", "--data", str(d["pref"]), "--eval_data",
                   str(d["pref_eval"]), "--max_steps", "1", "--per_device_train_batch_size", "4",
                   "--gradient_checkpointing", "false"],
            "03": ["--registry", reg, "--data", str(d["prompts"]), *TINY_PPO, "--total_episodes", "8"],
            "04": ["--registry", reg, "--ppo_model", "", "--models", "base=pretrain:latest", "--reward_model",
                   "reward:latest", "--prompts", str(d["prompts"]), "--eval_data", str(d["sft_eval"]),
                   "--max_prompts", "2", "--samples_per_prompt", "1", "--max_new_tokens", "4",
                   "--max_eval_dialogues", "2", "--bootstrap_resamples", "10", "--toxicity", "profanity-check",
                   "--num_threads", "1", "--output_dir", str(self.tmp / "report")],
        }[stage]

    def with_line(self, name: str, lineno: int, line: str | bytes, suffix: str = ".jsonl") -> Path:
        """A copy of tiny data file `name` with line `lineno` (1-based) replaced."""
        lines = self.data[name].read_bytes().splitlines(keepends=True)
        lines[lineno - 1] = (line.encode() if isinstance(line, str) else line) + b"\n"
        path = self.tmp / f"bad_{name}{suffix}"
        path.write_bytes(b"".join(lines))
        return path

    def file(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def parquet(self, columns: dict[str, list]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.tmp / "wrong_columns.parquet"
        pq.write_table(pa.table(columns), path)
        return path

    def yaml(self, text: str) -> Path:
        return self.file("config.yaml", text.encode())


# A case returns (extra CLI args, fragments the error must contain).
Build = Callable[[Ctx], tuple[list[str], list[str]]]


@dataclass(frozen=True)
class Case:
    stage: str
    kind: str
    build: Build
    env: dict[str, str] = field(default_factory=dict)
    within_s: float | None = None  # the whole run must take less
    succeeds: bool = False  # the input is handled (e.g. truncated) and the stage runs to the end


def _msg(role: str, content) -> dict:
    return {"role": role, "content": content}


USER, REPLY = _msg("user", "hi there"), _msg("assistant", "hello")


def _tokenizer_mismatch(ctx: Ctx) -> tuple[list[str], list[str]]:
    """A model folder whose tokenizer has 200 more tokens than the model embeds (e.g. a tokenizer from
    another model copied in by mistake)."""
    from transformers import AutoTokenizer

    from rlhf.registry import Registry

    folder = ctx.tmp / "mismatched_model"
    shutil.copytree(Registry(ctx.registry).get("pretrain:latest").path, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    n_model = len(tok)
    tok.add_tokens([f"extra_token_{i}" for i in range(200)])
    tok.save_pretrained(folder)
    return ["--model", str(folder)], [str(folder), f"tokenizer has {n_model + 200} tokens", str(n_model)]


def _huge_line(ctx: Ctx) -> tuple[list[str], list[str]]:
    bad = ctx.with_line("text", 2, json.dumps({"text": "word " * (1 << 20)}))  # a 5 MiB line
    return ["--data", str(bad)], [f"{bad}:2:", "expected at most 4194304 bytes per line"]


CASES = [
    # ---- 00 pretrain: `text` records; checked before torch is imported.
    Case("00", "wrong_types", lambda c: (["--data", str(b := c.with_line("text", 3, '{"text": 42}'))],
                                         [f"{b}:3:", "text: got 42, expected a non-empty string"])),
    Case("00", "empty_file", lambda c: (["--data", str(b := c.file("empty.jsonl", b""))], [f"{b}: file is empty"])),
    Case("00", "non_utf8", lambda c: (["--data", str(b := c.with_line("text", 2, b'{"text": "caf\xe9"}'))],
                                      [f"{b}:2:", "not valid UTF-8"])),
    Case("00", "huge_line", _huge_line),
    Case("00", "parquet_wrong_columns", lambda c: (["--data", str(b := c.parquet({"content": ["a b c"] * 4}))],
                                                   [str(b), "wrong columns", "missing text"])),
    Case("00", "hub_offline", lambda c: (["--data", "rlhf-tests/no-such-dataset"], ["rlhf-tests/no-such-dataset"]),
         env=NO_NETWORK, within_s=HUB_SECONDS),
    Case("00", "bad_batch_size", lambda c: (["--per_device_train_batch_size", "-1"],
                                            ["per_device_train_batch_size must be > 0, got -1"])),
    # ---- 01 sft: `dialogue` records, the starting model.
    Case("01", "missing_fields", lambda c: (
        ["--data", str(b := c.with_line("sft", 2, json.dumps({"messages": [{"role": "user"}, REPLY]})))],
        [f"{b}:2:", "messages[0].content: missing"])),
    Case("01", "unknown_role", lambda c: (
        ["--data", str(b := c.with_line("sft", 3, json.dumps({"messages": [USER, _msg("bot", "hello")]})))],
        [f"{b}:3:", "messages[1].role: got 'bot', expected one of system, user, assistant"])),
    Case("01", "empty_content", lambda c: (
        ["--data", str(b := c.with_line("sft", 4, json.dumps({"messages": [USER, _msg("assistant", "  ")]})))],
        [f"{b}:4:", "messages[1].content: got '  ', expected a non-empty string"])),
    Case("01", "unknown_ref", lambda c: (["--model", "pretrain:doesnotexist"],
                                         ["pretrain:doesnotexist: no entry with id 'doesnotexist'"])),
    Case("01", "tokenizer_mismatch", _tokenizer_mismatch),
    Case("01", "hub_offline", lambda c: (["--model", "rlhf-tests/no-such-model"],
                                         ["rlhf-tests/no-such-model", "HF_HUB_OFFLINE"]),
         env=OFFLINE, within_s=HUB_SECONDS),
    Case("01", "nonexistent_path", lambda c: (["--eval_data", str(m := c.tmp / "missing.jsonl")],
                                              [f"{m}: no such file"])),
    Case("01", "unknown_config_field", lambda c: (
        ["--config", str(y := c.yaml("model: pretrain:latest\nlerning_rate: 1.0e-3\n"))],
        [f"{y}:2: unknown field 'lerning_rate'"])),
    # ---- 02 reward: `preference` records.
    Case("02", "broken_json", lambda c: (["--data", str(b := c.with_line("pref", 3, '{"prompt": [{"role": '))],
                                         [f"{b}:3:", "invalid JSON"])),
    Case("02", "chosen_equals_rejected", lambda c: (
        ["--data", str(b := c.with_line("pref", 2, json.dumps({"prompt": [USER], "chosen": [REPLY],
                                                               "rejected": [REPLY]})))],
        [f"{b}:2:", "rejected: same as chosen"])),
    Case("02", "wrong_types", lambda c: (
        ["--data", str(b := c.with_line("pref", 4, json.dumps({"prompt": "hi there", "chosen": [REPLY],
                                                               "rejected": [_msg("assistant", "go away")]})))],
        [f"{b}:4:", "prompt: got 'hi there'"])),
    Case("02", "missing_fields", lambda c: (
        ["--data", str(b := c.with_line("pref", 5, json.dumps({"prompt": [USER], "chosen": [REPLY]})))],
        [f"{b}:5:", "rejected: missing"])),
    Case("02", "non_utf8", lambda c: (
        ["--eval_data", str(b := c.with_line("pref_eval", 1, b'{"prompt": [{"role": "user", "content": "\xff"}]}'))],
        [f"{b}:1:", "not valid UTF-8"])),
    Case("02", "parquet_wrong_columns", lambda c: (
        ["--data", str(b := c.parquet({"prompt": ["hi"] * 4, "response": ["hello"] * 4}))],
        [str(b), "wrong columns", "missing chosen, rejected"])),
    Case("02", "unknown_config_field", lambda c: (["--lerning_rate", "1e-3"],
                                                  ["unrecognized arguments: --lerning_rate"])),
    Case("02", "bad_batch_size", lambda c: (["--per_device_train_batch_size", "0"],
                                            ["per_device_train_batch_size must be > 0, got 0"])),
    # ---- 03 ppo: the sft and reward references, prompts, lengths (imports torch first: ~5 s a case).
    Case("03", "wrong_stage_ref", lambda c: (["--sft_model", "reward:latest"],
                                             ["reward:latest", "is a 'reward' entry", "'sft' or 'pretrain'"])),
    Case("03", "prompt_too_long", lambda c: (
        ["--data", str(write_long_prompts(c.tmp / "long.jsonl", 8)), "--max_prompt_length", "100"],
        ["max_prompt_length", "response_length", "64"])),
    Case("03", "hub_offline", lambda c: (["--sft_model", "rlhf-tests/no-such-model"],
                                         ["rlhf-tests/no-such-model", "cannot reach"]),
         env=NO_NETWORK, within_s=HUB_SECONDS),
    Case("03", "unknown_config_field", lambda c: (["--config", str(y := c.yaml("kl_coeff: 0.1\n"))],
                                                  [f"{y}:1: unknown field 'kl_coeff'"])),
    Case("03", "bad_batch_size", lambda c: (["--local_rollout_forward_batch_size", "-4"],
                                            ["local_rollout_forward_batch_size must be > 0, got -4"])),
    # ---- 04 compare: references, prompt and dialogue files.
    Case("04", "prompt_too_long", lambda c: (
        ["--prompts", str(write_long_prompts(c.tmp / "long.jsonl", 2)), "--max_prompt_length", "500",
         "--max_length", "500"], []), succeeds=True),
    Case("04", "wrong_stage_ref", lambda c: (["--ppo_model", "sft:latest"],
                                             ["sft:latest", "is a 'sft' entry", "'ppo'"])),
    Case("04", "unknown_ref", lambda c: (["--reward_model", "reward:doesnotexist"],
                                         ["reward:doesnotexist: no entry with id 'doesnotexist'"])),
    Case("04", "unknown_config_field", lambda c: (["--config", str(y := c.yaml("sample_per_prompt: 2\n"))],
                                                  [f"{y}:1: unknown field 'sample_per_prompt'"])),
    Case("04", "bad_batch_size", lambda c: (["--batch_size", "0"], ["batch_size must be > 0, got 0"])),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.stage}-{c.kind}" for c in CASES])
def test_bad_input_fails_cleanly_and_leaves_the_registry_alone(case: Case, rlhf_registry, tiny_data, tmp_path):
    reg = copy_registry(rlhf_registry, tmp_path / "runs")
    ctx = Ctx(tmp_path, tiny_data, reg)
    extra, expected = case.build(ctx)
    before = listing(reg)
    started = time.monotonic()
    res = run_script(STAGES[case.stage], *ctx.base_args(case.stage), *extra, env=case.env, timeout=300)
    seconds = time.monotonic() - started

    if case.succeeds:
        assert res.returncode == 0, res.stderr[-3000:]
        samples = (tmp_path / "report" / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 2, "every long prompt gets its samples"
    else:
        stderr = assert_clean_failure(res)
        for fragment in expected:
            assert fragment in stderr, f"{fragment!r} not in the message:\n{stderr[-3000:]}"
    if case.within_s is not None:
        assert seconds < case.within_s, f"took {seconds:.1f} s, expected a failure within seconds"
    assert listing(reg) == before, "the registry's rows changed"
    checked = verify(reg)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not list((reg / ".staging").glob("*")), "staging leftovers"


def test_every_kind_of_bad_input_is_covered_for_every_stage():
    """The matrix covers each kind the issue lists, every stage with at least 3 kinds."""
    kinds = {c.kind for c in CASES}
    assert kinds == set(ISSUE_KINDS), f"missing {set(ISSUE_KINDS) - kinds}, unknown {kinds - set(ISSUE_KINDS)}"
    per_stage = {s: {c.kind for c in CASES if c.stage == s} for s in STAGES}
    assert all(len(k) >= 3 for k in per_stage.values()), per_stage
    SUMMARY.append(f"reliability: {len(kinds)} kinds of bad input covered across {len(per_stage)} stages "
                   f"({len(CASES)} cases)")
