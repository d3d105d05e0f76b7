"""Stage 02: a reward model on preference pairs (chosen scored above rejected).

    python stages/02_reward.py --config configs/demo/reward.yaml
    python stages/02_reward.py --model Qwen/Qwen2.5-0.5B-Instruct --data trl-lib/ultrafeedback_binarized --mode qlora

InstructGPT style: the reward model starts from the SFT model (`sft:latest`) with a
scalar score head (AutoModelForSequenceClassification, num_labels=1) and is trained
with TRL's `RewardTrainer` as it ships on the Bradley-Terry loss
-log σ(r(prompt, chosen) - r(prompt, rejected)). Pairs are tokenized through the chat
template and cut after the reply's EOS, so the score is read at the token where PPO's
generations end; transformers' seq-cls heads find that last non-pad token through
`config.pad_token_id`, which must be the tokenizer's dedicated pad id.

Modes: `full`, `lora` and `qlora` (LoRA on a 4-bit NF4 base). The artifacts
(`rlhf.reward_model` documents the layout and how PPO loads it):
    full        the seq-cls model (safetensors) + tokenizer             reward_kind "model"
    lora/qlora  adapter/ (LoRA for the CAUSAL LM base) +                  reward_kind "adapter"
                score_head.safetensors (`weight` (1, H)[, `bias`]) + tokenizer
so PPO can load the SFT base once in 4-bit and attach this adapter and head to it.
Before registering, the saved adapter + head are re-applied to a freshly loaded
causal LM and must reproduce the trained model's scores.

Metrics on held-out pairs, scored here (`rlhf.reward_model.score_conversations`):
`eval_accuracy`, `eval_margin`, `eval_loss`; and `reward_mean` / `reward_std` over
the held-out chosen + rejected responses, which PPO uses to normalize the reward.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.config import TrainerStageConfig, _help, parse_config  # noqa: E402
from rlhf.errors import ConfigError, DataError, run_cli  # noqa: E402

N_CHECK = 8  # held-out conversations the reloaded adapter + head must reproduce
CHECK_RTOL = {"float32": 1e-3, "bfloat16": 3e-2}  # of the largest |score|; bf16 keeps ~3 significant digits


@dataclass
class RewardStageConfig(TrainerStageConfig):
    """Stage 02: train a scalar reward model on `preference` pairs."""

    model: str = _help("Starting model: registry ref (sft:latest, pretrain:<id>), local folder or hub id.", default="sft:latest")
    data_adapter: str | None = _help("Converter applied to both datasets first, for raw hub formats (e.g. 'hh-rlhf').", default=None)
    max_eval_pairs: int = _help("Score at most this many held-out pairs (-1: all).", default=-1)
    max_length: int = _help("Pairs whose chosen or rejected conversation is longer (tokens) are dropped from training.", default=512)
    per_device_train_batch_size: int = _help("Pairs per device per micro-batch (each pair is two sequences).", default=16)
    learning_rate: float = _help("Peak learning rate (cosine schedule).", default=1e-4)

    def validate(self) -> None:
        super().validate()
        if self.max_eval_pairs == 0 or self.max_eval_pairs < -1:
            raise ConfigError(f"max_eval_pairs must be > 0 or -1 (all), got {self.max_eval_pairs}")


def lora_config(cfg: RewardStageConfig):
    """LoRA on the backbone; the score head is trained in full (`modules_to_save`), as RewardTrainer advises."""
    from peft import LoraConfig

    from rlhf.models import lora_targets

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="SEQ_CLS",
                      target_modules=lora_targets(cfg.lora_target_modules), modules_to_save=["score"])


def tokenize_pairs(tokenizer, pairs: list[dict], max_length: int | None = None) -> dict[str, list[list[int]]]:
    """RewardTrainer's tokenized columns `chosen_ids` / `rejected_ids`: prompt + reply, ending at the reply's EOS."""
    from rlhf.reward_model import conversation_ids

    return {f"{key}_ids": [conversation_ids(tokenizer, p["prompt"] + p[key], max_length) for p in pairs]
            for key in ("chosen", "rejected")}


def save_reward_adapter(rm, base_path: str, tokenizer, folder: Path, load_in_4bit: bool, trust_remote_code: bool):
    """Save the backbone LoRA of the seq-cls reward model as an adapter of the CAUSAL LM base; return that model.

    The LoRA weights are loaded into a fresh causal LM wrapped with the same LoRA
    config: every LoRA tensor must find its module there (the backbone module names
    are the same under *ForSequenceClassification and *ForCausalLM, e.g.
    `transformer.h.0.attn.c_attn` for GPT-2, `model.layers.0.self_attn.q_proj` for Qwen2).
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from rlhf.models import fit_embeddings, load_model

    lora_state = {k: v for k, v in get_peft_model_state_dict(rm).items() if "lora_" in k}
    config = copy.deepcopy(rm.peft_config["default"])
    config.task_type, config.modules_to_save = "CAUSAL_LM", None
    causal = load_model(base_path, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    fit_embeddings(causal, tokenizer)
    reward_lm = get_peft_model(causal, config)
    loaded = set_peft_model_state_dict(reward_lm, lora_state)
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing:
        raise RuntimeError(f"LoRA tensors do not match the causal LM's modules: "
                           f"unexpected {loaded.unexpected_keys[:5]}, missing {missing[:5]}")
    reward_lm.save_pretrained(folder)
    return reward_lm


def main(cfg: RewardStageConfig) -> None:
    from rlhf.data_formats import explicit_pairs
    from rlhf.models import resolve_model
    from rlhf.registry import Registry
    from rlhf.stage import begin, finish, log, train_eval_data, trainer_kwargs

    # 1. Inputs: the starting model (a pretrain or sft entry, folder or hub id) and validated pairs (held-out ones
    #    from eval_data or a split of data).
    base = resolve_model(cfg.model, Registry(cfg.registry), stages=("pretrain", "sft"))
    data = train_eval_data("reward", cfg, "preference", adapter=cfg.data_adapter)
    train_pairs = explicit_pairs(data.train)
    eval_pairs = explicit_pairs(data.eval)[: cfg.max_eval_pairs if cfg.max_eval_pairs > 0 else None]
    base_ref = base.entry.ref if base.entry else cfg.model
    run = begin("reward", cfg, {**data.fingerprints, "model": base_ref})
    if run.reused:
        return

    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf.models import (compute_dtype, context_length, fit_embeddings, load_model, load_tokenizer,
                             trainable_to_compute_dtype)
    from rlhf.reward_model import adapter_dir, extract_score_head, pairwise_metrics, save_score_head, score_ids

    # 2. Model: a scalar score head on the starting model; 4-bit NF4 base for QLoRA.
    load_in_4bit = cfg.mode == "qlora"
    tokenizer = load_tokenizer(base.path, cfg.trust_remote_code)
    model = load_model(base.path, kind="score", load_in_4bit=load_in_4bit, trust_remote_code=cfg.trust_remote_code)
    fit_embeddings(model, tokenizer, cfg.model)
    # Seq-cls heads pool at the last token != config.pad_token_id; a wrong id scores the wrong token.
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = lora_config(cfg) if cfg.mode in ("lora", "qlora") else None
    cfg.max_length = context_length(model, cfg.max_length)

    # 3. Train: TRL's RewardTrainer as it ships, on pairs tokenized to end at the response's EOS
    #    (where PPO reads the reward; see conversation_ids). It drops pairs longer than max_length.
    train_ds = Dataset.from_dict(tokenize_pairs(tokenizer, train_pairs))
    args = RewardConfig(**trainer_kwargs(cfg, run), max_length=cfg.max_length,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                            peft_config=peft_config)
    trainable_to_compute_dtype(trainer.model)
    n_train = len(trainer.train_dataset)
    if n_train == 0:
        raise DataError(f"{cfg.data}: no pair fits in max_length={cfg.max_length} tokens; raise max_length")
    log(f"[reward] {n_train} train pairs ({len(train_pairs) - n_train} longer than {cfg.max_length} tokens dropped), "
        f"{len(eval_pairs)} held-out pairs, mode {cfg.mode}")
    train_out = trainer.train(resume_from_checkpoint=run.last_checkpoint() if cfg.resume else None)
    if not trainer.is_world_process_zero():
        return
    rm = trainer.model

    # 4. Evaluate on held-out pairs, and the reward scale over held-out chosen + rejected responses.
    eval_ids = tokenize_pairs(tokenizer, eval_pairs, cfg.max_length)
    eval_rows = eval_ids["chosen_ids"] + eval_ids["rejected_ids"]
    scores = score_ids(rm, eval_rows, tokenizer.pad_token_id, batch_size=2 * cfg.per_device_train_batch_size)  # (2N,)
    chosen, rejected = scores[: len(eval_pairs)], scores[len(eval_pairs):]
    pair = pairwise_metrics(chosen, rejected)
    metrics = {
        "eval_accuracy": pair["accuracy"],
        "eval_margin": pair["margin"],
        "eval_loss": pair["loss"],
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item(),
        "train_loss": train_out.training_loss,
        "train_pairs": n_train,
        "eval_pairs": len(eval_pairs),
        "steps": train_out.global_step,
    }
    # Pairs may carry a `kind` (the demo's: rude / off_topic / adversarial): accuracy per kind shows what the RM learned.
    for kind in sorted({p["kind"] for p in eval_pairs if isinstance(p.get("kind"), str)}):
        rows = [i for i, p in enumerate(eval_pairs) if p.get("kind") == kind]
        metrics[f"eval_accuracy/{kind}"] = (chosen[rows] > rejected[rows]).float().mean().item()

    # 5. Save: the seq-cls model, or the causal-LM adapter + score head (checked against the scores above).
    staged = run.registry.staging_dir("reward")
    if peft_config is None:
        rm.save_pretrained(staged)
    else:
        head = extract_score_head(rm)
        save_score_head(head, staged)
        reward_lm = save_reward_adapter(rm, base.path, tokenizer, adapter_dir(staged), load_in_4bit,
                                        cfg.trust_remote_code)
        again = score_ids(reward_lm, eval_rows[:N_CHECK], tokenizer.pad_token_id, head=head)
        gap = (again - scores[:N_CHECK]).abs().max().item()
        if gap > CHECK_RTOL[str(compute_dtype()).removeprefix("torch.")] * max(1.0, scores.abs().max().item()):
            raise RuntimeError(f"the saved adapter + score head on the causal LM give scores {gap:.3g} away from "
                               "the reward model's")
    tokenizer.save_pretrained(staged)

    # 6. Register with the starting model as parent (or its hub id in the config).
    finish(run, staged, cfg, parents=base.parents, metrics=metrics, data_fingerprints=data.fingerprints,
           extra_config={"reward_kind": "model" if peft_config is None else "adapter", "base_model": base_ref,
                         "load_in_4bit": load_in_4bit, **data.recorded})


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(RewardStageConfig))))
