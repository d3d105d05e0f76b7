"""Stage 02 (reward model) through its real command line on the tiny fixtures, plus the scoring invariants.

The reward model starts from the tiny `pretrain` entry (an SFT entry would only add a run).
One full-mode run is interrupted after its first checkpoint and resumed; the tests of
the full mode, of scoring and of refused references read that registry.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script
from rlhf.registry import Registry

STAGE = "stages/02_reward.py"
TINY = ["--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--gradient_checkpointing", "false"]
METRIC_KEYS = {"eval_accuracy", "eval_margin", "eval_loss", "reward_mean", "reward_std"}

# Runs the stage's real CLI, but raises KeyboardInterrupt (what Ctrl-C raises) right after
# the Trainer has written its first checkpoint: a deterministic interruption, no timing.
INTERRUPT_AFTER_FIRST_CHECKPOINT = f"""
import runpy, sys
from transformers import trainer_callback

def on_save(self, args, state, control):
    raise KeyboardInterrupt(f"simulated interruption after checkpoint-{{state.global_step}}")

trainer_callback.CallbackHandler.on_save = on_save
sys.argv[0] = {STAGE!r}
runpy.run_path({STAGE!r}, run_name="__main__")
"""


def reward_args(registry: Path, tiny_data: dict[str, Path], *extra: str) -> list[str]:
    return ["--registry", str(registry), "--model", "pretrain:latest", "--data", str(tiny_data["pref"]),
            "--eval_data", str(tiny_data["pref_eval"]), *TINY, *extra]


def entries(registry: Path, stage: str):
    return Registry(registry).entries(stage)


def eval_rows(tokenizer, tiny_data: dict[str, Path]) -> list[list[int]]:
    from rlhf.reward_model import conversation_ids

    pairs = [json.loads(line) for line in tiny_data["pref_eval"].read_text().splitlines()]
    return [conversation_ids(tokenizer, p["prompt"] + p[k]) for k in ("chosen", "rejected") for p in pairs]


@pytest.fixture(scope="module")
def resumed_registry(tmp_path_factory, pretrained_registry, tiny_data) -> dict:
    """A full-mode run killed after checkpoint-2 of 4, then finished with --resume."""
    reg = tmp_path_factory.mktemp("reward") / "runs"
    shutil.copytree(pretrained_registry, reg)
    args = reward_args(reg, tiny_data, "--mode", "full", "--max_steps", "4", "--save_steps", "2")
    first = run_script("-c", INTERRUPT_AFTER_FIRST_CHECKPOINT, *args)
    work = list((reg / ".work").glob("reward-*"))
    state = {"first": first, "rows_after_first": len(entries(reg, "reward")),
             "checkpoints": sorted(p.name for w in work for p in w.glob("checkpoint-*"))}
    state["second"] = run_script(STAGE, *args, "--resume")
    state["registry"] = reg
    return state


@pytest.mark.slow
def test_resume_after_interruption_continues_from_checkpoint_and_registers_once(resumed_registry):
    """--resume picks up the interrupted run's last checkpoint; a crash never registers; one row in the end."""
    first, second = resumed_registry["first"], resumed_registry["second"]
    assert first.returncode == 130, first.stderr[-3000:]
    assert resumed_registry["rows_after_first"] == 0
    assert resumed_registry["checkpoints"] == ["checkpoint-2"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "checkpoint-2" in second.stderr
    rows = entries(resumed_registry["registry"], "reward")
    assert len(rows) == 1
    assert rows[0].metrics["steps"] == 4


@pytest.mark.slow
def test_full_mode_registers_seq_cls_model_with_parent_metrics_and_changed_weights(resumed_registry):
    """Full mode: a seq-cls model whose backbone moved from its init, the pretrain entry as parent,
    the metric keys PPO reads."""
    from safetensors.torch import load_file

    reg = resumed_registry["registry"]
    (rm,) = entries(reg, "reward")
    (base,) = entries(reg, "pretrain")
    assert rm.parents == [base.ref]
    assert METRIC_KEYS <= set(rm.metrics) and all(math.isfinite(rm.metrics[k]) for k in METRIC_KEYS)
    assert 0.0 <= rm.metrics["eval_accuracy"] <= 1.0 and rm.metrics["reward_std"] > 0
    assert rm.config["reward_kind"] == "model" and rm.config["base_model"] == base.ref
    assert rm.config["load_in_4bit"] is False
    assert (rm.path / "tokenizer.json").is_file() and (rm.path / "tensorboard").is_dir()
    trained, init = load_file(str(rm.path / "model.safetensors")), load_file(str(base.path / "model.safetensors"))
    assert trained["score.weight"].shape == (1, 64)
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(trained[name], init[name])


@pytest.mark.slow
def test_scores_do_not_change_with_extra_right_padding_or_batching(resumed_registry, tiny_data):
    """The score is read at the last real token (the reply's EOS): extra pad columns, batch size and order
    never change it, and it equals the score head applied to the final hidden state there (the seq-cls
    pooling is right)."""
    from rlhf.models import load_model, load_tokenizer
    from rlhf.reward_model import last_token_scores, score_ids
    from rlhf.sequences import right_pad

    (rm,) = entries(resumed_registry["registry"], "reward")
    tokenizer = load_tokenizer(str(rm.path))
    model = load_model(str(rm.path), kind="score")
    assert model.config.pad_token_id == tokenizer.pad_token_id
    rows = eval_rows(tokenizer, tiny_data)
    assert all(r[-1] == tokenizer.eos_token_id for r in rows)  # read where PPO's generations end, not at "\n"
    pad = tokenizer.pad_token_id
    base = score_ids(model, rows, pad, batch_size=16)
    assert torch.allclose(score_ids(model, rows, pad, batch_size=16, extra_padding=7), base, atol=1e-5)
    assert torch.allclose(score_ids(model, rows, pad, batch_size=1), base, atol=1e-5)
    ids, mask = right_pad(rows, pad, max(map(len, rows)) + 2)  # (B, T)
    with torch.no_grad():
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    assert torch.allclose(last_token_scores(hidden, mask, model.score.weight), base, atol=1e-5)


def test_pairwise_metrics_and_last_token_scores_by_hand():
    """accuracy / margin / Bradley-Terry loss and the head read at the rightmost real token, worked out by hand."""
    from rlhf.reward_model import last_token_scores, pairwise_metrics

    m = pairwise_metrics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]))
    assert m["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"] == pytest.approx(0.0)
    softplus = lambda x: math.log1p(math.exp(x))  # -log σ(d) = softplus(-d)
    assert m["loss"] == pytest.approx((softplus(-1) + softplus(1) + softplus(0)) / 3)
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)  # (B=2, T=4, H=2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])  # right-padded; left-padded
    scores = last_token_scores(hidden, mask, torch.tensor([[1.0, 0.0]]), torch.tensor([0.5]))  # first feature + 0.5
    assert scores.tolist() == [hidden[0, 1, 0].item() + 0.5, hidden[1, 3, 0].item() + 0.5]


@pytest.mark.slow
def test_wrong_stage_reference_is_refused_in_one_line_without_a_new_row(resumed_registry, tiny_data, tmp_path):
    """A reward or ppo entry is not a starting model: one `error:` line, exit 2, no row added."""
    reg = tmp_path / "runs"
    shutil.copytree(resumed_registry["registry"], reg)
    staged = Registry(reg).staging_dir("ppo")
    (staged / "metrics.json").write_text("{}")
    Registry(reg).register("ppo", staged, parents=[], config={}, metrics={})  # a stand-in ppo entry
    for ref in ("reward:latest", "ppo:latest"):
        res = run_script(STAGE, *reward_args(reg, tiny_data, "--model", ref))
        assert res.returncode == 2, res.stderr[-3000:]
        lines = res.stderr.strip().splitlines()
        stage = ref.split(":")[0]
        assert len(lines) == 1 and lines[0].startswith(f"error: {ref}: is a '{stage}' entry"), res.stderr
        assert "needs a 'pretrain' or 'sft' entry" in lines[0]
    assert len(entries(reg, "reward")) == 1 and len(entries(reg, "ppo")) == 1


@pytest.mark.slow
def test_qlora_saves_a_causal_lm_adapter_and_score_head_that_reproduce_the_metrics(pretrained_registry, tiny_data,
                                                                                   tmp_path):
    """QLoRA on a 4-bit base: `adapter/` applies to the CAUSAL LM (same module names) and with
    `score_head.safetensors` reproduces the registered reward_mean / reward_std, as PPO will load it."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file

    from rlhf.models import load_model, load_tokenizer
    from rlhf.reward_model import load_score_head, score_ids

    reg = tmp_path / "runs"
    shutil.copytree(pretrained_registry, reg)
    res = run_script(STAGE, *reward_args(reg, tiny_data, "--mode", "qlora", "--max_steps", "3", "--lora_r", "4"))
    assert res.returncode == 0, res.stderr[-3000:]
    (rm,) = entries(reg, "reward")
    (base,) = entries(reg, "pretrain")
    assert rm.parents == [base.ref]
    assert rm.config["reward_kind"] == "adapter" and rm.config["base_model"] == base.ref
    assert rm.config["load_in_4bit"] is True
    adapter_config = json.loads((rm.path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and not adapter_config["modules_to_save"]
    tensors = load_file(str(rm.path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in tensors
    head = load_score_head(rm.path)
    assert set(head) == {"weight"} and head["weight"].shape == (1, 64)

    tokenizer = load_tokenizer(str(rm.path))
    causal = load_model(str(base.path), load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in causal.modules())
    reward_lm = PeftModel.from_pretrained(causal, str(rm.path / "adapter"))
    rows = eval_rows(tokenizer, tiny_data)
    scores = score_ids(reward_lm, rows, tokenizer.pad_token_id, head=head)
    assert scores.mean().item() == pytest.approx(rm.metrics["reward_mean"], abs=1e-4)
    assert scores.std().item() == pytest.approx(rm.metrics["reward_std"], abs=1e-4)
    with reward_lm.disable_adapter():  # the adapter matters: without it the scores move
        assert not torch.allclose(score_ids(reward_lm, rows, tokenizer.pad_token_id, head=head), scores, atol=1e-4)


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/reward.yaml")))
def test_every_reward_config_loads_with_known_fields(config):
    """configs/<model>/reward.yaml (real runs that cannot run here) parse: every field exists, values are valid."""
    import runpy

    from rlhf.config import load_config

    stage = runpy.run_path(str(ROOT / STAGE))  # not run as __main__: defines the config, runs nothing
    cfg = load_config(stage["RewardStageConfig"], ROOT / config)
    assert cfg.mode in ("full", "lora", "qlora")
