"""The TRL side of the critic-free part of scripts/bench_ppo.py: one run of TRL's GRPOTrainer or RLOOTrainer.

    .venv/bin/python scripts/bench_trl_critic_free.py SPEC.json OUT.json
    .venv/bin/python scripts/bench_trl_critic_free.py --imports-only     # the baseline process

It runs in our own virtualenv, with the TRL the project installs (1.16), unlike scripts/bench_trl_peer.py.
The policy is the SFT folder in 4-bit NF4 (TRL's `quantization_config`) with a LoRA `peft_config`, so the
reference is the adapter turned off. The reward is ours, handed to TRL as two reward functions with TRL's
signature (`reward_funcs`): `rm_score`, the reward entry's normalized score read by our code
(`rlhf.reward_model.score_ids`) from its adapter and head on a 4-bit copy of the same SFT base (the weights
our one-base mode reads), and `toxicity`, −toxicity_coef × our toxicity scorer (`rlhf.safety`).
SPEC (a JSON object) holds everything:

    trainer              "grpo" (GRPOTrainer) or "rloo" (RLOOTrainer)
    sft_path             causal LM folder: the policy's start, and the reward model's base
    reward_dir           reward entry folder of kind "adapter" on that base (adapter and score head)
    reward_mean, reward_std, toxicity, toxicity_coef      what our stage reads from the entry and its config
    prompts              the prompts' messages, in the order they are to be sampled (`shuffle_dataset` false):
                         TRL renders them with the tokenizer's chat template
    prompt_ids           our token ids of the same prompts (dataset column `bench_prompt_ids`, read by rm_score)
    as_shipped           false: fp32 compute and LoRA weights, no gradient checkpointing, as ours; true: GRPOConfig /
                         RLOOConfig's own defaults for those (bf16 autocast, gradient checkpointing, and TRL's cast
                         of a quantized model's trainable weights to bf16)
    seed, lora_r, lora_alpha, and the GRPOConfig / RLOOConfig fields named in CONFIG_FIELDS (GRPO_FIELDS)

OUT gets {"ok", "loop_s", "step_end_s", "logs", "error", "model_memory_mb", "prompt_ids_match", ...}:
`loop_s` is the wall time of `trainer.train()` alone; `step_end_s` the time at the end of each optimizer
step, from the start of train(). A failure is recorded with its error text for the parent to report.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # rlhf: the reward functions are our code
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_trl_peer: the child protocol both peers share

CONFIG_FIELDS = ("num_generations", "max_completion_length", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "steps_per_generation", "num_iterations", "max_steps",
                 "learning_rate", "beta", "epsilon", "temperature", "weight_decay", "adam_epsilon", "max_grad_norm",
                 "lr_scheduler_type", "shuffle_dataset")
GRPO_FIELDS = ("loss_type", "scale_rewards")  # GRPOConfig only


def import_libraries():
    """What every run imports: the baseline process stops here."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from datasets import Dataset  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: F401

    import rlhf.reward_model  # noqa: F401
    from rlhf.safety import load_scorer

    load_scorer("profanity-check")


def reward_funcs(spec: dict) -> list:
    """[rm_score, toxicity]: our reward's two components with TRL's reward-function signature
    (prompts, completions, completion_ids, **dataset columns) -> one float per completion."""
    import numpy as np
    from peft import PeftModel

    from rlhf.models import fit_embeddings, load_model, load_tokenizer
    from rlhf.quant import set_cpu_4bit_packing
    from rlhf.reward_model import adapter_dir, load_score_head, score_ids
    from rlhf.safety import load_scorer

    tokenizer = load_tokenizer(spec["sft_path"])
    base = load_model(spec["sft_path"], load_in_4bit=True)
    fit_embeddings(base, tokenizer)
    base.requires_grad_(False)
    model = PeftModel.from_pretrained(base, str(adapter_dir(spec["reward_dir"]))).eval()
    # Our base trains, so it never uses bitsandbytes' CPU inference layout, whose scores differ slightly.
    set_cpu_4bit_packing(model, enabled=False)
    head = load_score_head(spec["reward_dir"])
    scorer = load_scorer(spec["toxicity"])
    mean, std, coef, pad = spec["reward_mean"], spec["reward_std"], spec["toxicity_coef"], tokenizer.pad_token_id

    def rm_score(prompts, completions, completion_ids, bench_prompt_ids, **kwargs):
        """(RM − reward_mean) / reward_std of prompt + completion, read at its last token, as our rollout does."""
        rows = [list(p) + list(c) for p, c in zip(bench_prompt_ids, completion_ids)]
        return ((score_ids(model, rows, pad, head=head) - mean) / std).tolist()

    def toxicity(prompts, completions, **kwargs):
        """−toxicity_coef × the scorer's probability of the completion's text."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return (-coef * np.asarray(scorer.score(texts), dtype=np.float64)).tolist()

    return [rm_score, toxicity]


def run(spec: dict, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from rlhf.models import load_tokenizer

    grpo = spec["trainer"] == "grpo"
    tokenizer = load_tokenizer(spec["sft_path"])
    tokenizer.padding_side = "left"
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                             target_modules="all-linear")
    fields = {k: spec[k] for k in CONFIG_FIELDS + (GRPO_FIELDS if grpo else ())}
    precision = {} if spec["as_shipped"] else {"gradient_checkpointing": False, "bf16": False, "fp16": False}
    args = (GRPOConfig if grpo else RLOOConfig)(
        output_dir=out_dir, seed=spec["seed"], model_init_kwargs={"dtype": torch.float32, "device_map": {"": "cpu"}},
        use_cpu=True, disable_dropout=True, top_k=0, top_p=1.0, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, **precision, **fields)
    # TRL renders the prompts itself; the rm_score function reads our ids of the same prompts from this column.
    train = Dataset.from_dict({"prompt": spec["prompts"], "bench_prompt_ids": spec["prompt_ids"]})
    rendered = tokenizer.apply_chat_template(spec["prompts"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    from bench_trl_peer import step_clock

    clock, steps, log_rows = step_clock(TrainerCallback)

    funcs = reward_funcs(spec)
    trainer = (GRPOTrainer if grpo else RLOOTrainer)(
        model=spec["sft_path"], reward_funcs=funcs, args=args, train_dataset=train, processing_class=tokenizer,
        quantization_config=quantization, peft_config=peft_config, callbacks=[clock])
    if not spec["as_shipped"]:
        # TRL casts the trainable weights of a quantized model to bf16 (its QLoRA recipe); ours trains them in fp32.
        # The optimizer is built in train(), so it gets the fp32 tensors.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    memory = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.time()
    trainer.train()
    loop_s = time.time() - t0
    return {"ok": True, "loop_s": loop_s, "step_end_s": steps, "logs": log_rows, "model_memory_mb": memory,
            "trainable_params": n_trainable, "error": None,
            "prompt_ids_match": sum(list(a) == list(b) for a, b in zip(rendered, spec["prompt_ids"])) / len(rendered)}


def main() -> None:
    """The same child protocol as TRL 1.12's peer (scripts/bench_trl_peer.py), with this file's functions."""
    from bench_trl_peer import main as child_main

    child_main(import_libraries, run)


if __name__ == "__main__":
    main()
