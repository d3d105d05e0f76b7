"""Stage 01: supervised fine-tuning on dialogues, loss on assistant tokens only.

    python stages/01_sft.py --config configs/demo/sft.yaml
    python stages/01_sft.py --model Qwen/Qwen2.5-0.5B --data HuggingFaceH4/ultrachat_200k --data_split train_sft --mode qlora

TRL's `SFTTrainer` does the training as it ships, on dialogues tokenized here with
their assistant mask (`rlhf.chat_format.assistant_mask`: the replies and the EOS closing
each keep their labels; system and user turns, role headers and separators carry -100),
so the loss is on assistant tokens under any chat template, not only the ones TRL has a
training variant of. Modes: `full` fine-tuning, `lora` (peft) and
`qlora` (LoRA on a 4-bit NF4 base). With LoRA the registered artifact is the
merged full-precision model, so later stages can load it as a base, quantized or
not; the adapter is kept in `adapter/`.

`exclude_labels` drops the dialogues a label field marks (`label_field`, default `kind`; the demo's
rude replies are `kind: rude`) from the training and the held-out data, and records how many.

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
from rlhf.errors import ConfigError, run_cli  # noqa: E402


@dataclass
class SFTStageConfig(TrainerStageConfig):
    """Stage 01: supervised fine-tuning of a causal LM on `dialogue` data."""

    model: str = _help("Starting model: registry ref (pretrain:latest), local folder or hub id.", default="pretrain:latest")
    max_length: int = _help("Truncate tokenized dialogues to this many tokens.", default=256)
    gen_eval_samples: int = _help("Held-out dialogues used for BLEU/ROUGE-L (0: skip).", default=64)
    max_new_tokens: int = _help("Reply length for the BLEU/ROUGE-L evaluation.", default=48)
    exclude_labels: list[str] = _help(
        "Drop the dialogues whose `label_field` is one of these (comma-separated on the command line), from the "
        "training and the held-out data; dialogues without the field are kept. The demo's rude replies are "
        "`kind: rude` (kept in the demo: `--exclude_labels rude` trains on the clean rest). Empty: keep all.",
        default_factory=list)
    label_field: str = _help("The record field `exclude_labels` reads.", default="kind")

    def validate(self) -> None:
        super().validate()
        if self.exclude_labels and not self.label_field:
            raise ConfigError("label_field: empty, but exclude_labels needs the name of the record field to read")


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


def sft_dataset(tokenizer, records: list[dict]):
    """A `datasets.Dataset` of `input_ids` and `assistant_masks` (SFTTrainer turns the mask into labels)."""
    from datasets import Dataset

    from rlhf.chat_format import assistant_mask

    rows = [assistant_mask(tokenizer, r["messages"]) for r in records]
    return Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "assistant_masks": [m for _, m in rows]})


def main(cfg: SFTStageConfig) -> None:
    from rlhf.models import (context_length, fit_embeddings, load_model, load_tokenizer, lora_config, resolve_model,
                             save_trained_model, trainable_to_compute_dtype)
    from rlhf.quant import set_cpu_4bit_packing
    from rlhf.registry import Registry
    from rlhf.stage import (begin, exclude_labelled_data, finish, log, train_eval_data, trainer_kwargs,
                            trainer_metrics)

    # 1. Inputs: the starting model and validated dialogues (held-out ones from eval_data or a split of data),
    #    less the ones whose label is excluded.
    base = resolve_model(cfg.model, Registry(cfg.registry), stages=("pretrain", "sft"))
    data = train_eval_data("sft", cfg, "dialogue")
    if cfg.exclude_labels:
        data = exclude_labelled_data("sft", data, cfg.label_field, cfg.exclude_labels)
    train_records, eval_records = data.train, data.eval
    run = begin("sft", cfg, {**data.fingerprints, "model": base.entry.ref if base.entry else cfg.model})
    if run.reused:
        return
    from trl import SFTConfig, SFTTrainer  # heavy imports after the inputs are known to be good: bad input fails fast

    # 2. Model: full precision, or 4-bit NF4 for QLoRA; LoRA adapters for lora/qlora.
    tokenizer = load_tokenizer(base.path, cfg.trust_remote_code)
    model = load_model(base.path, load_in_4bit=cfg.mode == "qlora", trust_remote_code=cfg.trust_remote_code)
    fit_embeddings(model, tokenizer, cfg.model)
    set_cpu_4bit_packing(model, enabled=False)  # we evaluate, then train: see its docstring
    peft_config = (lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
                   if cfg.mode in ("lora", "qlora") else None)
    cfg.max_length = context_length(model, cfg.max_length)

    # 3. Trainer: TRL's SFTTrainer as it ships, on tokenized dialogues whose labels are their assistant tokens
    #    (TRL's own assistant_only_loss needs a template with generation markers, which few models ship).
    train_ds, eval_ds = sft_dataset(tokenizer, train_records), sft_dataset(tokenizer, eval_records)
    args = SFTConfig(**trainer_kwargs(cfg, run), max_length=cfg.max_length,
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
    final_model = save_trained_model(trainer.model, staged, lora=peft_config is not None, base_path=base.path,
                                     tokenizer=tokenizer, trust_remote_code=cfg.trust_remote_code)

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
