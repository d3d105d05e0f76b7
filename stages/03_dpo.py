"""Stage 03 (DPO): align the SFT model directly on preference pairs, the other road to step 3.

    python stages/03_dpo.py --config configs/demo/dpo.yaml
    python stages/03_dpo.py --model sft:latest --data Anthropic/hh-rlhf --data_adapter hh-rlhf --mode qlora

Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) needs no
reward model and no sampling: with π the policy and π_ref the frozen starting model, each pair
(x, y_w chosen, y_l rejected) has the implicit reward r(x, y) = β · (log π(y|x) − log π_ref(y|x))
(summed over the reply's tokens), and the default loss (`loss_type: sigmoid`) is
−log σ(r(x, y_w) − r(x, y_l)). TRL's `DPOTrainer` does the training as it ships; `beta`
and `loss_type` are its options under its names.

Modes, chosen as in stage 01:
    full        the policy is the whole model; the reference a second copy, loaded here the way the
                policy is (so tokens `load_tokenizer` adds have the same embedding rows in both)
    lora/qlora  LoRA on the starting model (4-bit NF4 for qlora); the reference is the same model with
                the adapter disabled (TRL's behaviour with a peft model and ref_model=None): one copy
The registered artifact is a full-precision causal LM in every mode, so `dpo:latest` loads wherever
`sft:latest` does (stage 04's `--models`, scripts/chat.py); LoRA runs also keep `adapter/`.

Metrics on held-out pairs, from TRL's evaluation (policy vs reference): `eval_loss`,
`eval_rewards/accuracies` (share of pairs whose implicit reward ranks chosen first),
`eval_rewards/margins`, `eval_rewards/chosen`, `eval_rewards/rejected`, `eval_logps/chosen`,
`eval_logps/rejected`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.config import TrainerStageConfig, _help, check_positive, parse_config  # noqa: E402
from rlhf.errors import ConfigError, DataError, run_cli  # noqa: E402

# TRL 1.16's DPOTrainer loss types, except 'exo_pair': it needs TRL's label_smoothing > 0, which this stage does
# not expose.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# TRL's evaluation metrics the entry records (TRL logs a few more: logits/*, entropy, mean_token_accuracy).
EVAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
                "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


@dataclass
class DPOStageConfig(TrainerStageConfig):
    """Stage 03 (DPO): align a causal LM on `preference` pairs with TRL's DPOTrainer."""

    model: str = _help("Starting model, also the reference: registry ref (sft:latest, pretrain:<id>), local folder "
                       "or hub id.", default="sft:latest")
    data_adapter: str | None = _help("Converter applied to both datasets first, for raw hub formats (e.g. 'hh-rlhf').",
                                     default=None)
    beta: float = _help("TRL's `beta`: how strongly the policy is held to the reference (the implicit KL penalty's "
                        "weight; higher stays closer). For loss_type ipo it is the regularizer τ.", default=0.1)
    loss_type: list[str] = _help(f"TRL's `loss_type`: one or more of {', '.join(LOSS_TYPES)} (comma-separated on "
                                 "the command line; several are summed with equal weights).",
                                 default_factory=lambda: ["sigmoid"])
    max_length: int = _help("Longest prompt + reply, in tokens: longer ones keep their start; pairs whose prompt "
                            "alone fills it are dropped.", default=512)
    per_device_train_batch_size: int = _help("Pairs per device per micro-batch (each pair is two sequences, run "
                                             "through the policy and the reference).", default=8)
    learning_rate: float = _help("Peak learning rate (cosine schedule). The default is TRL's, meant for full "
                                 "fine-tuning; LoRA adapters take larger ones.", default=1e-6)

    def validate(self) -> None:
        super().validate()
        check_positive(self, "beta")
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if not self.loss_type or unknown:
            raise ConfigError(f"loss_type: got {unknown or 'nothing'}, expected one or more of {', '.join(LOSS_TYPES)}")


def preference_dataset(pairs: list[dict]) -> Any:
    """TRL's conversational preference dataset (columns prompt, chosen, rejected) of explicit pairs."""
    from datasets import Dataset

    return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def build_trainer(cfg: DPOStageConfig, base_path: str, run: Any, train_pairs: list[dict],
                  eval_pairs: list[dict]) -> Any:
    """TRL's DPOTrainer on the starting model at `base_path`; `run` (`rlhf.stage.StageRun`) gives the work folder.

    Full mode passes the reference copy in; lora/qlora pass `ref_model=None` with a peft config, and TRL then
    computes the reference log-probs with the adapter disabled (`trainer.ref_model` stays None).
    """
    from trl import DPOConfig, DPOTrainer

    from rlhf.models import (context_length, fit_embeddings, load_model, load_tokenizer, lora_config,
                             trainable_to_compute_dtype)
    from rlhf.stage import trainer_kwargs

    tokenizer = load_tokenizer(base_path, cfg.trust_remote_code)
    model = load_model(base_path, load_in_4bit=cfg.mode == "qlora", trust_remote_code=cfg.trust_remote_code)
    fit_embeddings(model, tokenizer, cfg.model)
    ref_model, peft_config = None, None
    if cfg.mode == "full":
        ref_model = load_model(base_path, trust_remote_code=cfg.trust_remote_code)
        fit_embeddings(ref_model, tokenizer, cfg.model)
    else:
        peft_config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    cfg.max_length = context_length(model, cfg.max_length)

    args = DPOConfig(**trainer_kwargs(cfg, run), beta=cfg.beta, loss_type=list(cfg.loss_type),
                     max_length=cfg.max_length, gradient_checkpointing=cfg.gradient_checkpointing)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=preference_dataset(train_pairs),
                         eval_dataset=preference_dataset(eval_pairs), processing_class=tokenizer,
                         peft_config=peft_config)
    trainable_to_compute_dtype(trainer.model)  # QLoRA: TRL casts the adapter to bf16; the CPU computes in fp32
    return trainer


def main(cfg: DPOStageConfig) -> None:
    from rlhf.data_formats import explicit_pairs
    from rlhf.models import resolve_model, save_trained_model
    from rlhf.registry import Registry
    from rlhf.stage import begin, finish, log, train_eval_data

    # 1. Inputs: the starting model (an sft entry, or pretrain / folder / hub id) and validated pairs (held-out ones
    #    from eval_data or a split of data).
    base = resolve_model(cfg.model, Registry(cfg.registry), stages=("sft", "pretrain"))
    data = train_eval_data("dpo", cfg, "preference", adapter=cfg.data_adapter)
    train_pairs, eval_pairs = explicit_pairs(data.train), explicit_pairs(data.eval)
    base_ref = base.entry.ref if base.entry else cfg.model
    run = begin("dpo", cfg, {**data.fingerprints, "model": base_ref})
    if run.reused:
        return

    # 2. Model and trainer: the policy, its reference (a copy, or the adapter disabled) and TRL's DPOTrainer.
    trainer = build_trainer(cfg, base.path, run, train_pairs, eval_pairs)
    n_train, n_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    if n_train == 0 or n_eval == 0:  # TRL drops the pairs whose prompt alone fills max_length
        source = cfg.data if n_train == 0 else cfg.eval_data or cfg.data
        raise DataError(f"{source}: no pair's prompt fits in max_length={cfg.max_length} tokens; raise max_length")
    log(f"[dpo] {n_train} train / {n_eval} held-out pairs, mode {cfg.mode}, loss {'+'.join(cfg.loss_type)}, "
        f"beta {cfg.beta}, reference: " + ("a second copy" if trainer.ref_model is not None else "adapter disabled"))

    # 3. Train, then evaluate policy vs reference on the held-out pairs.
    train_out = trainer.train(resume_from_checkpoint=run.last_checkpoint() if cfg.resume else None)
    evaluated = trainer.evaluate()
    if not trainer.is_world_process_zero():
        return

    # 4. Save: the full model, or the adapter + the merged full-precision model.
    staged = run.registry.staging_dir("dpo")
    tokenizer = trainer.processing_class
    save_trained_model(trainer.model, staged, lora=cfg.mode != "full", base_path=base.path, tokenizer=tokenizer,
                       trust_remote_code=cfg.trust_remote_code)
    metrics = {**{k: evaluated[k] for k in EVAL_METRICS}, "train_loss": train_out.training_loss,
               "train_pairs": n_train, "eval_pairs": n_eval, "steps": train_out.global_step}

    # 5. Register with the starting model as parent (or its hub id in the config).
    finish(run, staged, cfg, parents=base.parents, metrics=metrics, data_fingerprints=data.fingerprints,
           extra_config={"base_model": base_ref, "load_in_4bit": cfg.mode == "qlora", **data.recorded})


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(DPOStageConfig))))
