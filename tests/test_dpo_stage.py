"""Stage 03 (DPO) on the tiny sft entry: full and QLoRA through the command line, what the reference is, bad data.

The CLI runs work on copies of the session's `rlhf_registry` (pretrain + sft + a fake reward entry). The full run
also goes through the shared reader's `on_invalid: skip` and held-out split (no eval_data), the QLoRA run through
the hh-rlhf adapter, so DPO reads preference data exactly as stage 02 does.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import load_stage, run_script
from rlhf.registry import Entry, Registry

STAGE = "stages/03_dpo.py"
# Two optimizer steps of 4 pairs, one intra-op thread (tiny models: a second thread only adds CPU time).
TINY = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--gradient_checkpointing", "false", "--max_length", "128"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
EVAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
                "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


def _copy(registry: Path, dst: Path) -> Path:
    shutil.copytree(registry, dst)
    return dst


def _dpo(reg: Path, *args: str):
    return run_script(STAGE, "--registry", str(reg), "--model", "sft:latest", *TINY, *args, env=ONE_THREAD)


def _with_bad_line(src: Path, dst: Path, lineno: int) -> Path:
    """A copy of a preference file whose line `lineno` has rejected == chosen (invalid)."""
    lines = src.read_text().splitlines()
    record = json.loads(lines[lineno - 1])
    lines[lineno - 1] = json.dumps({**record, "rejected": record["chosen"]})
    dst.write_text("\n".join(lines) + "\n")
    return dst


def _as_hh_rlhf(src: Path, dst: Path) -> Path:
    """The explicit pairs of `src` written in Anthropic hh-rlhf's raw text format."""
    def text(turns: list[dict]) -> str:
        return "".join(f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns)

    rows = [json.loads(line) for line in src.read_text().splitlines()]
    dst.write_text("".join(json.dumps({"chosen": text(r["prompt"] + r["chosen"]),
                                       "rejected": text(r["prompt"] + r["rejected"])}) + "\n" for r in rows))
    return dst


def _reply_logps(model, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """(N,) Σ log p(reply | prompt) per (prompt ids, reply ids) row, one unpadded row at a time: worked out
    without TRL's collator or its fused LM head."""
    out = []
    with torch.no_grad():
        for prompt, reply in rows:
            ids = torch.tensor([prompt + reply])  # (1, T)
            logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V): position t predicts token t+1
            logps = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]  # (T-1,)
            out.append(logps[-len(reply):].sum())
    return torch.stack(out)


def _sft(reg: Path) -> Entry:
    return Registry(reg).get("sft:latest")


@pytest.fixture(scope="module")
def dpo_full(rlhf_registry, tiny_data, tmp_path_factory) -> tuple[Path, Entry]:
    """Full mode without eval_data (a held-out split of data) on a file with one invalid line, on_invalid skip."""
    tmp = tmp_path_factory.mktemp("dpo_full")
    reg = _copy(rlhf_registry, tmp / "runs")
    bad = _with_bad_line(tiny_data["pref"], tmp / "pref_one_bad.jsonl", 5)
    res = _dpo(reg, "--mode", "full", "--data", str(bad), "--on_invalid", "skip")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reference: a second copy" in res.stderr
    (entry,) = Registry(reg).entries("dpo")
    return reg, entry


@pytest.fixture(scope="module")
def dpo_qlora(rlhf_registry, tiny_data, tmp_path_factory) -> tuple[Path, Entry]:
    """QLoRA on hh-rlhf-format files (the `hh-rlhf` data adapter), eval_data given."""
    tmp = tmp_path_factory.mktemp("dpo_qlora")
    reg = _copy(rlhf_registry, tmp / "runs")
    train = _as_hh_rlhf(tiny_data["pref"], tmp / "hh_train.jsonl")
    held_out = _as_hh_rlhf(tiny_data["pref_eval"], tmp / "hh_eval.jsonl")
    res = _dpo(reg, "--mode", "qlora", "--lora_r", "4", "--lora_alpha", "8", "--data", str(train),
               "--eval_data", str(held_out), "--data_adapter", "hh-rlhf")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "reference: adapter disabled" in res.stderr
    (entry,) = Registry(reg).entries("dpo")
    return reg, entry


# ------------------------------------------------------------------------------------ modes through the CLI


def _check_entry(reg: Path, entry: Entry, mode: str) -> None:
    """A `dpo` entry whose parent is the sft entry (lineage down to pretrain), with TRL's held-out metrics."""
    registry = Registry(reg)
    sft = _sft(reg)
    assert entry.parents == [sft.ref]
    assert [e.stage for e in registry.lineage(entry.ref)] == ["dpo", "sft", "pretrain"]
    assert entry.config["mode"] == mode and entry.config["base_model"] == sft.ref
    assert entry.config["load_in_4bit"] is (mode == "qlora")
    assert entry.metrics["steps"] == 2
    for key in EVAL_METRICS:
        assert math.isfinite(entry.metrics[key]), key
    assert 0.0 <= entry.metrics["eval_rewards/accuracies"] <= 1.0
    assert (entry.path / "tensorboard").is_dir() and (entry.path / "tokenizer.json").is_file()
    assert registry.verify() == {}
    assert not any((reg / ".work").glob("dpo-*"))


@pytest.mark.slow
def test_full_dpo_registers_child_of_sft_that_loads_as_a_chat_model(dpo_full):
    """Full mode: the entry loads where `sft:latest` does (rlhf.models.load_chat_model: scripts/chat.py and
    stage 04's --models), its weights moved from the SFT model's, and the shared reader's skip and held-out split
    are recorded."""
    from rlhf.models import load_chat_model

    reg, entry = dpo_full
    _check_entry(reg, entry, "full")
    assert not (entry.path / "adapter").exists()
    assert entry.config["data_skipped"] == {"data": 1}
    split = entry.config["heldout_split"]
    assert split["source"] == "data" and split["eval_rows"] == entry.metrics["eval_pairs"] == 8
    assert split["train_rows"] == entry.metrics["train_pairs"] == 56 - 1 - 8  # pref.jsonl: 56 pairs, one made invalid
    assert set(entry.data_fingerprints) == {"data"}

    model, tokenizer, resolved = load_chat_model(f"dpo:{entry.id}", Registry(reg))
    assert resolved.entry.ref == entry.ref
    sft_model, _, _ = load_chat_model("sft:latest", Registry(reg))
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(model.state_dict()[name], sft_model.state_dict()[name])


@pytest.mark.slow
def test_qlora_dpo_keeps_the_adapter_and_a_merged_model_equal_to_sft_plus_adapter(dpo_qlora, tiny_data):
    """QLoRA: `adapter/` plus the merged full-precision model, whose outputs are the SFT model's with that adapter
    applied, and not the SFT model's own (the adapter was trained)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_model, load_tokenizer

    reg, entry = dpo_qlora
    _check_entry(reg, entry, "qlora")
    assert entry.config["data_adapter"] == "hh-rlhf"
    assert entry.metrics["train_pairs"] == 56 and entry.metrics["eval_pairs"] == 8
    assert set(entry.data_fingerprints) == {"data", "eval_data"}
    assert (entry.path / "adapter" / "adapter_model.safetensors").is_file()

    merged = AutoModelForCausalLM.from_pretrained(entry.path)
    assert all(p.dtype == torch.float32 for p in merged.parameters()), "the merged model must not stay quantized"
    sft = _sft(reg)
    with_adapter = PeftModel.from_pretrained(load_model(str(sft.path)), str(entry.path / "adapter"))
    tokenizer = load_tokenizer(str(entry.path))
    pair = json.loads(tiny_data["pref_eval"].read_text().splitlines()[0])
    ids = torch.tensor([tokenizer.apply_chat_template(pair["prompt"] + pair["chosen"], return_dict=True)["input_ids"]])
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
        torch.testing.assert_close(logits, with_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        with with_adapter.disable_adapter():
            assert not torch.allclose(logits, with_adapter(input_ids=ids).logits, atol=1e-3)


# ------------------------------------------------------------------------------------ the reference


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_reference_is_the_starting_model_while_the_policy_moves(rlhf_registry, tiny_data, tmp_path, mode):
    """The trainer as the stage builds it, with the policy pushed away from the SFT model: the reference
    log-probs TRL uses (read back from its implicit rewards, r = β·(log π − log π_ref)) are the SFT model's own,
    computed here from a separately loaded copy (4-bit for qlora), while its policy log-probs are the moved
    policy's. With LoRA the trainer holds no second model: the reference is the same model, adapter disabled."""
    from peft import PeftModel

    from rlhf.config import load_config
    from rlhf.data_formats import explicit_pairs
    from rlhf.models import load_model

    stage = load_stage("03_dpo.py")
    sft = _sft(rlhf_registry)
    cfg = load_config(stage.DPOStageConfig, overrides={
        "data": str(tiny_data["pref"]), "model": str(sft.path), "mode": mode, "lora_r": 4, "lora_alpha": 8,
        "per_device_train_batch_size": 8, "max_length": 128, "gradient_checkpointing": False, "beta": 0.5})
    pairs = explicit_pairs(json.loads(line) for line in tiny_data["pref_eval"].read_text().splitlines())[:8]
    trainer = stage.build_trainer(cfg, str(sft.path), SimpleNamespace(work_dir=tmp_path), pairs, pairs)
    if mode == "full":
        assert trainer.ref_model is not None
        policy_storage = {p.data_ptr() for p in trainer.model.parameters()}
        assert not {p.data_ptr() for p in trainer.ref_model.parameters()} & policy_storage
    else:
        assert trainer.ref_model is None, "LoRA needs no second model: the reference is the adapter disabled"
        assert isinstance(trainer.model, PeftModel)

    torch.manual_seed(0)
    with torch.no_grad():  # move the policy: random LoRA factors (B starts at zero), or noise on every weight
        for name, param in trainer.model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * (0.3 if "lora_" in name else 0.05))
    metrics = trainer.evaluate()  # the 8 pairs in one batch: TRL's means are over exactly these pairs

    rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    starting = load_model(str(sft.path), load_in_4bit=mode == "qlora")
    trainer.model.eval()
    for side in ("chosen", "rejected"):
        pairs_ids = [(r["prompt_ids"], r[f"{side}_ids"]) for r in rows]
        ref_trl = metrics[f"eval_logps/{side}"] - metrics[f"eval_rewards/{side}"] / cfg.beta
        ref_here = _reply_logps(starting, pairs_ids).mean().item()
        policy_here = _reply_logps(trainer.model, pairs_ids).mean().item()
        assert abs(policy_here - ref_here) > 1.0, "the push must move the policy, or the check below proves nothing"
        assert metrics[f"eval_logps/{side}"] == pytest.approx(policy_here, abs=1e-3)
        assert ref_trl == pytest.approx(ref_here, abs=1e-3)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_invalid_pair_fails_in_one_line_naming_file_and_line_and_registers_nothing(rlhf_registry, tiny_data,
                                                                                  tmp_path):
    """An invalid pair (on_invalid: error, the default): exit 1, one `error:` line, the FILE:LINE and field of the
    problem, no traceback, no dpo row, no work folder."""
    reg = _copy(rlhf_registry, tmp_path / "runs")
    before = [e.ref for e in Registry(reg).entries()]
    bad = _with_bad_line(tiny_data["pref"], tmp_path / "bad_pref.jsonl", 3)
    res = _dpo(reg, "--data", str(bad), "--eval_data", str(tiny_data["pref_eval"]))
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: 1 problem in {bad} (preference schema)"], res.stderr[-2000:]
    assert f"{bad}:3: rejected: same as chosen, expected a different response" in res.stderr.splitlines()
    assert [e.ref for e in Registry(reg).entries()] == before
    assert not any((reg / ".work").glob("dpo-*")) and not any((reg / ".staging").glob("dpo-*"))


def test_config_takes_trl_loss_types_and_refuses_unknown_ones():
    """`loss_type` is TRL's list (comma-separated on the command line); an unknown one or beta <= 0 is a
    ConfigError naming the field."""
    from rlhf.config import load_config
    from rlhf.errors import ConfigError

    cls = load_stage("03_dpo.py").DPOStageConfig
    assert load_config(cls, overrides={"data": "pairs.jsonl"}).loss_type == ["sigmoid"]
    two = load_config(cls, overrides={"data": "pairs.jsonl", "loss_type": "sigmoid,sft"})
    assert two.loss_type == ["sigmoid", "sft"]
    with pytest.raises(ConfigError, match=r"loss_type: got \['dpo'\], expected one or more of sigmoid, hinge"):
        load_config(cls, overrides={"data": "pairs.jsonl", "loss_type": "dpo"})
    with pytest.raises(ConfigError, match="beta must be > 0"):
        load_config(cls, overrides={"data": "pairs.jsonl", "beta": 0})
