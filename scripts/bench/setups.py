"""The shared setup every run uses, built once in the work folder, and the SFT policy's start score on it.

A tiny GPT-2-style model trained through our stage CLIs (pretrain -> sft -> a LoRA reward model), whose
reward model is registered twice with reward_mean 0 / reward_std 1: as an adapter on the SFT base (our
one-base mode) and merged into a sequence-classification folder (TRL's reward and value model; also our
`reward_kind: model`). Random-weight models of other widths and a GPT-2-small-shaped one are registered
the same way. The reward entries' file layout is `rlhf.reward_model`'s (`adapter_dir`, `save_score_head`).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import child_env, run_child
from .stats import mean, standard_error

if TYPE_CHECKING:  # pragma: no cover
    from .runs import Settings

GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}


@dataclass
class Setup:
    """Registry refs and folders every run uses (`<work>/setup.json`)."""

    registry: str
    prompts: str
    sft: str  # tiny trained model: sft entry ref
    reward_adapter: str  # same RM as an adapter on `sft` (our one-base mode)
    reward_model: str  # same RM as a seq-cls entry (our separate mode; TRL's folder below)
    rm_folder: str
    rm_check_max_abs_diff: float
    synthetic: dict[str, dict] = field(default_factory=dict)  # name -> {sft, reward_adapter, rm_folder, n_params}
    setup_s: float = 0.0


SETUP_VERSION = 3  # raise when what the setup builds changes: a saved setup of another version is rebuilt
SETUP_WIDTHS = [64, 128, 256, 512, 1024]
STAGE_ARGS = {
    "pretrain": ["--vocab_size", "2048", "--n_layer", "2", "--n_embd", "128", "--n_head", "4", "--block_size", "256",
                 "--max_steps", "150", "--learning_rate", "2e-3", "--logging_steps", "50", "--save_steps", "1000"],
    "sft": ["--max_steps", "60", "--gen_eval_samples", "0", "--learning_rate", "1e-3", "--logging_steps", "20",
            "--save_steps", "1000"],
    "reward": ["--mode", "lora", "--max_steps", "60", "--lora_dropout", "0", "--gradient_checkpointing", "false",
               "--learning_rate", "1e-3", "--logging_steps", "20", "--save_steps", "1000"],
}


def build_setup(work: Path, threads: int, rebuild: bool, widths: list[int] = SETUP_WIDTHS) -> Setup:
    """Build (or reuse) the registry described in the module docstring."""
    marker = work / "setup.json"
    key = {"version": SETUP_VERSION, "stages": STAGE_ARGS, "widths": sorted(widths)}
    if marker.exists() and not rebuild:
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            return Setup(**saved["setup"])
    t0 = time.time()
    if work.exists():
        shutil.rmtree(work)
    reg, data = work / "runs", work / "data"
    env = child_env(threads)

    def stage(*args: str) -> None:
        res = run_child([sys.executable, *args], env, 3600, work / "logs" / f"setup-{Path(args[0]).stem}.log")
        if res["rc"]:
            raise SystemExit(f"setup step {args[0]} failed (log {res['log']}):\n{res['log_tail']}")

    stage("scripts/make_demo_data.py", "--out", str(data))
    stage("stages/00_pretrain.py", "--registry", str(reg), "--data", str(data / "pretrain.jsonl"),
          *STAGE_ARGS["pretrain"])
    stage("stages/01_sft.py", "--registry", str(reg), "--data", str(data / "sft_train.jsonl"),
          "--eval_data", str(data / "sft_heldout.jsonl"), *STAGE_ARGS["sft"])
    stage("stages/02_reward.py", "--registry", str(reg), "--data", str(data / "pref_train.jsonl"),
          "--eval_data", str(data / "pref_heldout.jsonl"), *STAGE_ARGS["reward"])

    from rlhf.registry import Registry

    registry = Registry(reg)
    sft = registry.get("sft:latest")
    adapter_ref, model_ref, rm_folder, gap = export_reward(registry, registry.get("reward:latest"),
                                                           data / "pref_heldout.jsonl")
    setup = Setup(registry=str(reg), prompts=str(data / "prompts_train.jsonl"), sft=sft.ref,
                  reward_adapter=adapter_ref, reward_model=model_ref, rm_folder=rm_folder, rm_check_max_abs_diff=gap)
    for w in widths:
        setup.synthetic[f"width{w}"] = synthetic_model(registry, sft.path, n_embd=w, n_layer=2, n_head=4,
                                                       vocab_size=0, with_seqcls=False)
    setup.synthetic["gpt2_small"] = synthetic_model(registry, sft.path, **GPT2_SMALL, with_seqcls=True)
    setup.setup_s = time.time() - t0
    marker.write_text(json.dumps({"key": key, "setup": asdict(setup)}, indent=1))
    return setup


def export_reward(registry: Any, raw: Any, heldout: Path) -> tuple[str, str, str, float]:
    """Register the RM `raw` (adapter kind) as adapter and as merged seq-cls model, head / reward_std.

    Returns (adapter ref, model ref, seq-cls folder, max |score difference| of the two on 16 held-out
    conversations)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.reward_model import adapter_dir, conversation_ids, load_score_head, save_score_head, score_ids

    sft = registry.get(raw.config["base_model"])
    std = float(raw.metrics.get("reward_std", 1.0)) or 1.0
    head = {k: v / std for k, v in load_score_head(raw.path).items()}
    unit = {"reward_mean": 0.0, "reward_std": 1.0, "source": raw.ref, "head_divided_by": std}

    staged = registry.staging_dir("reward")
    shutil.copytree(raw.path, staged, dirs_exist_ok=True)
    save_score_head(head, staged)
    adapter = registry.register("reward", staged, parents=[sft.ref], config={**raw.config, "bench": "adapter"},
                                metrics=unit)

    tok = AutoTokenizer.from_pretrained(str(sft.path))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft.path)),
                                       str(adapter_dir(adapter.path))).merge_and_unload()
    staged = registry.staging_dir("reward")
    merged.save_pretrained(str(staged))
    seqcls = AutoModelForSequenceClassification.from_pretrained(str(staged), num_labels=1)
    if "bias" in head and head["bias"].abs().max() > 0:
        raise SystemExit("the reward head has a bias; a GPT-2 seq-cls score head has none")
    with torch.no_grad():
        seqcls.score.weight.copy_(head["weight"])
    seqcls.config.pad_token_id = tok.pad_token_id
    shutil.rmtree(staged)  # the merged causal LM: only its weights were wanted, under the seq-cls class
    staged.mkdir(parents=True)
    seqcls.save_pretrained(str(staged))
    tok.save_pretrained(str(staged))
    model = registry.register("reward", staged, parents=[sft.ref], metrics=unit,
                              config={"reward_kind": "model", "base_model": sft.ref, "load_in_4bit": False,
                                      "bench": "merged seq-cls of " + adapter.ref})

    rows = [json.loads(x) for x in heldout.read_text().splitlines()[:8]]
    convs = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
    ids = [conversation_ids(tok, c) for c in convs]
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft.path)),
                                   str(adapter_dir(adapter.path)))
    a = score_ids(lm, ids, tok.pad_token_id, head=head)
    b = score_ids(AutoModelForSequenceClassification.from_pretrained(str(model.path)), ids, tok.pad_token_id)
    return adapter.ref, model.ref, str(model.path), float((a - b).abs().max())


def synthetic_model(registry: Any, tokenizer_path: str, *, n_embd: int, n_layer: int, n_head: int, vocab_size: int,
                    with_seqcls: bool, n_positions: int = 512, seed: int = 0) -> dict[str, Any]:
    """A random-weight GPT-2 registered as `sft`, with a reward adapter (LoRA B = 0, random head) on it;
    with `with_seqcls` also the same RM as a seq-cls folder (base weights + that head) for TRL."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.reward_model import adapter_dir, save_score_head

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=max(vocab_size, len(tok)), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    staged = registry.staging_dir("sft")
    model.save_pretrained(str(staged))
    tok.save_pretrained(str(staged))
    sft = registry.register("sft", staged, parents=[], config={"bench": "random weights", **config.to_diff_dict()},
                            metrics={"n_params": n_params})
    head = {"weight": torch.randn(1, n_embd) / math.sqrt(n_embd)}  # scores of order 1
    staged = registry.staging_dir("reward")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(str(adapter_dir(staged)))
    save_score_head(head, staged)
    tok.save_pretrained(str(staged))
    unit = {"reward_mean": 0.0, "reward_std": 1.0}
    adapter = registry.register("reward", staged, parents=[sft.ref], metrics=unit,
                                config={"reward_kind": "adapter", "base_model": sft.ref, "load_in_4bit": False})
    out = {"sft": sft.ref, "reward_adapter": adapter.ref, "rm_folder": None, "n_params": n_params, "n_embd": n_embd}
    if with_seqcls:  # LoRA B = 0: the merged RM is the base itself with the head
        seqcls = AutoModelForSequenceClassification.from_pretrained(str(sft.path), num_labels=1)
        with torch.no_grad():
            seqcls.score.weight.copy_(head["weight"])
        staged = registry.staging_dir("reward")
        seqcls.save_pretrained(str(staged))
        tok.save_pretrained(str(staged))
        out["rm_folder"] = str(registry.register(
            "reward", staged, parents=[sft.ref], metrics=unit,
            config={"reward_kind": "model", "base_model": sft.ref, "load_in_4bit": False}).path)
    return out


def sft_start_score(setup: Setup, s: Settings, four_bit: bool, samples: int = 4, seed: int = 12345) -> dict[str, Any]:
    """The SFT policy's own mean score on every training prompt, `samples` responses each, sampled and scored
    as the runs do (RM score minus the EOS penalty: TRL's `objective/scores`). Every run of both
    implementations starts from this policy, so score gains are measured from this one number."""
    import torch

    from rlhf.data import load_records
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.ppo.rollout import rollout
    from rlhf.registry import Registry

    registry = Registry(setup.registry)
    sft, rm = registry.get(setup.sft), registry.get(setup.reward_adapter)
    tok = load_tokenizer(str(sft.path))
    cpu = torch.device("cpu")
    ac = build_actor_critic(str(sft.path), tok, load_in_4bit=four_bit, lora_r=s.lora_r, lora_alpha=s.lora_alpha,
                            lora_target_modules="all-linear", reward_dir=rm.path, separate_reward=None, device=cpu)
    prompts = encode_prompts(tok, [r["messages"] for r in load_records(setup.prompts, "prompt")], 128)
    chunk = 32
    torch.manual_seed(seed)
    scores: list[float] = []
    for _ in range(samples):
        for i in range(0, len(prompts), chunk):
            batch = rollout(ac, prompts[i:i + chunk], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                            temperature=s.temperature, response_length=s.response_length, forward_batch_size=chunk,
                            group_by_length=True, device=cpu)
            scores += (batch.rm_scores - s.missing_eos_penalty * (~batch.has_eos).float()).tolist()
    return {"mean": mean(scores), "se": standard_error(scores), "n": len(scores)}
