"""Stage 00: train a small causal LM from scratch on unlabeled text (the demo's base model).

    python stages/00_pretrain.py --config configs/demo/pretrain.yaml
    python stages/00_pretrain.py --data my_corpus.jsonl --model gpt2      # continued pre-training

From scratch it trains a byte-level BPE tokenizer with a dedicated pad token, an
EOS (`<|end|>`) that ends every turn and the demo chat template
(`rlhf.chat_format`), then a GPT-2-style model (full precision) on the texts
packed into blocks of `block_size` tokens. With `--model` it continues training
an existing model (registry reference, folder or hub id) with its own tokenizer.
The result (safetensors + tokenizer) is registered as stage `pretrain`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf import chat_format  # noqa: E402
from rlhf.config import StageConfig, _help, check_positive, parse_config  # noqa: E402
from rlhf.errors import ConfigError, run_cli  # noqa: E402


@dataclass
class PretrainConfig(StageConfig):
    """Stage 00: pre-train (or continue pre-training) a causal LM on a `text` dataset."""

    data: str = _help("Text data: a .jsonl/.json/.parquet file of {\"text\": str} or a hub dataset id.", default="")
    data_split: str = _help("Split to read when `data` is a hub dataset.", default="train")
    model: str | None = _help("Continue training this model (registry ref, folder, hub id) instead of starting from scratch.", default=None)
    vocab_size: int = _help("From scratch: BPE vocabulary size (special tokens included).", default=2048)
    n_layer: int = _help("From scratch: transformer layers.", default=2)
    n_embd: int = _help("From scratch: hidden size.", default=128)
    n_head: int = _help("From scratch: attention heads.", default=4)
    block_size: int = _help("Tokens per training sequence (texts are packed); also the context length from scratch.", default=256)
    eval_fraction: float = _help("Share of packed blocks held out for eval_loss.", default=0.02)
    num_train_epochs: float = _help("Passes over the data (ignored when max_steps > 0).", default=1.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1: use num_train_epochs).", default=-1)
    per_device_train_batch_size: int = _help("Sequences per device per step.", default=16)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate (cosine schedule with warmup).", default=1e-3)
    warmup_ratio: float = _help("Share of steps spent warming the learning rate up.", default=0.05)
    weight_decay: float = _help("AdamW weight decay.", default=0.01)
    logging_steps: int = _help("Log loss every N steps (progress bar, TensorBoard).", default=20)
    save_steps: int = _help("Write a resumable checkpoint every N steps.", default=100)
    trust_remote_code: bool = _help("Allow model code from the hub (only for models you trust).", default=False)

    def validate(self) -> None:
        super().validate()
        self.require("data")
        check_positive(self, "vocab_size", "n_layer", "n_embd", "n_head", "block_size",
                       "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                       "logging_steps", "save_steps")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.eval_fraction < 0.5:
            raise ConfigError(f"eval_fraction must be in (0, 0.5), got {self.eval_fraction}")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with the demo's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=chat_format.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=chat_format.BOS,
        eos_token=chat_format.EOS,
        pad_token=chat_format.PAD,
        additional_special_tokens=list(chat_format.ROLE_TOKENS.values()),
    )
    tok.chat_template = chat_format.CHAT_TEMPLATE
    return tok


def pack(texts: list[str], tokenizer, block_size: int) -> list[list[int]]:
    """Concatenate `BOS text` documents and cut the stream into full blocks (the tail is dropped)."""
    stream: list[int] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(bos + ids)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def main(cfg: PretrainConfig) -> None:
    from rlhf.data import fingerprint
    from rlhf.models import fit_embeddings, load_model, load_tokenizer, resolve_model
    from rlhf.registry import Registry
    from rlhf.stage import begin, finish, log, read_data, trainer_kwargs, trainer_metrics

    # 1. Inputs: validated text records and (optionally) the model to continue from.
    records, skipped = read_data("pretrain", cfg.data, "text", split=cfg.data_split, on_invalid=cfg.on_invalid)
    texts = [r["text"] for r in records]
    base = resolve_model(cfg.model, Registry(cfg.registry)) if cfg.model else None
    inputs = {"data": fingerprint(cfg.data), "model": base.entry.ref if base and base.entry else str(cfg.model)}
    run = begin("pretrain", cfg, inputs)
    if run.reused:
        return
    import torch  # heavy imports after the inputs are known to be good: bad input fails in a second
    from datasets import Dataset
    from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer,
                              TrainingArguments)

    # 2. Tokenizer and model.
    if base is None:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    else:
        tokenizer = load_tokenizer(base.path, cfg.trust_remote_code)
        model = load_model(base.path, trust_remote_code=cfg.trust_remote_code)
    fit_embeddings(model, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[pretrain] {len(texts)} texts, model with {n_params / 1e6:.2f}M parameters")

    # 3. Data: pack into blocks, hold a few out.
    blocks = pack(texts, tokenizer, cfg.block_size)
    if len(blocks) < 4:
        raise ConfigError(f"{cfg.data}: only {len(blocks)} blocks of {cfg.block_size} tokens; need more text or a smaller block_size")
    n_eval = max(1, int(len(blocks) * cfg.eval_fraction))
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(blocks), generator=g).tolist()
    train_ds = Dataset.from_dict({"input_ids": [blocks[i] for i in order[n_eval:]]})
    eval_ds = Dataset.from_dict({"input_ids": [blocks[i] for i in order[:n_eval]]})

    # 4. Train (resumable from the work folder's checkpoints).
    args = TrainingArguments(**trainer_kwargs(cfg, run), weight_decay=cfg.weight_decay)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=collator)
    train_out = trainer.train(resume_from_checkpoint=run.last_checkpoint() if cfg.resume else None)
    eval_loss = trainer.evaluate()["eval_loss"]

    # 5. Save and register.
    if not trainer.is_world_process_zero():
        return
    staged = run.registry.staging_dir("pretrain")
    trainer.model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    metrics = {**trainer_metrics(train_out, eval_loss), "n_params": n_params,
               "train_tokens": len(train_ds) * cfg.block_size}
    finish(run, staged, cfg, parents=base.parents if base else [], metrics=metrics,
           data_fingerprints={"data": inputs["data"]},
           extra_config={"base_model": cfg.model, "data_skipped": {"data": skipped}})


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(PretrainConfig))))
