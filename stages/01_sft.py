"""Stage 01: supervised fine-tuning on dialogues, loss on assistant tokens only.

    python stages/01_sft.py --config configs/demo/sft.yaml
    python stages/01_sft.py --model Qwen/Qwen2.5-0.5B --data HuggingFaceH4/ultrachat_200k --data_split train_sft --mode qlora

TRL's `SFTTrainer` does the training as it ships (`assistant_only_loss=True`: user
and system tokens carry label -100). Modes: `full` fine-tuning, `lora` (peft) and
`qlora` (LoRA on a 4-bit NF4 base). With LoRA the registered artifact is the
merged full-precision model, so later stages can load it as a base, quantized or
not; the adapter is kept in `adapter/`.

Evaluation on held-out dialogues: `eval_loss` / `eval_perplexity` after training,
`base_eval_perplexity` of the starting model on the same data (did SFT help?),
and BLEU / ROUGE-L of greedy replies against the held-out last assistant turns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.config import TrainerStageConfig, _help, parse_config  # noqa: E402
from rlhf.errors import run_cli  # noqa: E402


@dataclass
class SFTStageConfig(TrainerStageConfig):
    """Stage 01: supervised fine-tuning of a causal LM on `dialogue` data."""

    model: str = _help("Starting model: registry ref (pretrain:latest), local folder or hub id.", default="pretrain:latest")
    max_length: int = _help("Truncate tokenized dialogues to this many tokens.", default=256)
    gen_eval_samples: int = _help("Held-out dialogues used for BLEU/ROUGE-L (0: skip).", default=64)
    max_new_tokens: int = _help("Reply length for the BLEU/ROUGE-L evaluation.", default=48)


def lora_config(cfg: SFTStageConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    from rlhf.models import lora_targets

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type=task_type,
                      target_modules=lora_targets(cfg.lora_target_modules))


def generation_metrics(model, tokenizer, dialogues: list[dict], cfg: SFTStageConfig) -> dict[str, float]:
    """BLEU and ROUGE-L of greedy replies to held-out dialogues against their last assistant turn."""
    from rlhf.generation import generate_replies
    from rlhf.eval.text import bleu, rouge_l

    sample = dialogues[: cfg.gen_eval_samples]
    prompts = [d["messages"][:-1] for d in sample]
    refs = [d["messages"][-1]["content"] for d in sample]
    replies, _ = generate_replies(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                  max_prompt_length=cfg.max_length - cfg.max_new_tokens)
    return {"bleu": bleu(replies, refs), "rouge_l": rouge_l(replies, refs)}


def merge_lora(base_path: str, adapter_dir: Path, tokenizer, trust_remote_code: bool):
    """The base in full precision with the adapter merged in (a plain model later stages load as a base)."""
    from peft import PeftModel

    from rlhf.models import fit_embeddings, load_model

    base = load_model(base_path, trust_remote_code=trust_remote_code)
    fit_embeddings(base, tokenizer)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def main(cfg: SFTStageConfig) -> None:
    from rlhf.models import (context_length, fit_embeddings, load_model, load_tokenizer, resolve_model,
                             trainable_to_compute_dtype)
    from rlhf.quant import set_cpu_4bit_packing
    from rlhf.registry import Registry
    from rlhf.stage import begin, finish, log, train_eval_data, trainer_kwargs, trainer_metrics

    # 1. Inputs: the starting model and validated dialogues (held-out ones from eval_data or a split of data).
    base = resolve_model(cfg.model, Registry(cfg.registry), stages=("pretrain", "sft"))
    data = train_eval_data("sft", cfg, "dialogue")
    train_records, eval_records = data.train, data.eval
    run = begin("sft", cfg, {**data.fingerprints, "model": base.entry.ref if base.entry else cfg.model})
    if run.reused:
        return
    from datasets import Dataset  # heavy imports after the inputs are known to be good: bad input fails in a second
    from trl import SFTConfig, SFTTrainer

    # 2. Model: full precision, or 4-bit NF4 for QLoRA; LoRA adapters for lora/qlora.
    tokenizer = load_tokenizer(base.path, cfg.trust_remote_code)
    model = load_model(base.path, load_in_4bit=cfg.mode == "qlora", trust_remote_code=cfg.trust_remote_code)
    fit_embeddings(model, tokenizer, cfg.model)
    set_cpu_4bit_packing(model, enabled=False)  # we evaluate, then train: see its docstring
    peft_config = lora_config(cfg) if cfg.mode in ("lora", "qlora") else None
    cfg.max_length = context_length(model, cfg.max_length)

    # 3. Trainer: TRL's SFTTrainer as it ships, assistant tokens only.
    keep = ["messages"]
    train_ds = Dataset.from_list([{k: r[k] for k in keep} for r in train_records])
    eval_ds = Dataset.from_list([{k: r[k] for k in keep} for r in eval_records])
    args = SFTConfig(**trainer_kwargs(cfg, run), assistant_only_loss=True, max_length=cfg.max_length,
                     gradient_checkpointing=cfg.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config)
    trainable_to_compute_dtype(trainer.model)  # QLoRA: TRL casts the adapter to bf16; the CPU computes in fp32

    # 4. Evaluate the starting model (a fresh LoRA adapter is a no-op), train, evaluate again.
    base_eval_loss = trainer.evaluate()["eval_loss"]
    log(f"[sft] {len(train_ds)} train / {len(eval_ds)} held-out dialogues; base eval_loss {base_eval_loss:.4f}")
    train_out = trainer.train(resume_from_checkpoint=run.last_checkpoint() if cfg.resume else None)
    eval_loss = trainer.evaluate()["eval_loss"]
    if not trainer.is_world_process_zero():
        return

    # 5. Save: full model, or adapter + merged full-precision model.
    staged = run.registry.staging_dir("sft")
    if peft_config is None:
        final_model = trainer.model
    else:
        trainer.model.save_pretrained(staged / "adapter")
        final_model = merge_lora(base.path, staged / "adapter", tokenizer, cfg.trust_remote_code)
    final_model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)

    metrics = {**trainer_metrics(train_out, eval_loss), **trainer_metrics(None, base_eval_loss, prefix="base_")}
    if cfg.gen_eval_samples > 0:
        metrics.update(generation_metrics(final_model, tokenizer, eval_records, cfg))

    # 6. Register with the starting model as parent (or its hub id in the config).
    finish(run, staged, cfg, parents=base.parents, metrics=metrics, data_fingerprints=data.fingerprints,
           extra_config={"base_model": base.entry.ref if base.entry else cfg.model, "load_in_4bit": cfg.mode == "qlora",
                         **data.recorded})


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(SFTStageConfig))))
