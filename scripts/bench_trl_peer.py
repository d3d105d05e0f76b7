"""The peer of scripts/bench_ppo.py: one run of TRL 1.12's `trl.experimental.ppo.PPOTrainer`.

    .bench/trl112/bin/python scripts/bench_trl_peer.py SPEC.json OUT.json
    .bench/trl112/bin/python scripts/bench_trl_peer.py --imports-only     # the baseline process

It runs inside the benchmark's own virtualenv (`.bench/trl112/`, TRL 1.12.0 from PyPI), so it
imports nothing from this repository: the parent hands it everything in SPEC (a JSON object):

    sft_path             causal LM folder (policy start; reference when `ref` is "copy")
    rm_path              sequence-classification reward model folder (num_labels=1)
    prompt_ids           [[int]]: the tokenized prompts (the same ids our PPO samples from)
    policy_4bit          load the policy in 4-bit NF4 and train a LoRA `peft_config` (ref = adapter off)
    value                "full": the value model is the RM folder trained in full (TRL's example)
                         "qlora": the RM folder in 4-bit NF4 with a LoRA adapter (leanest setup)
    reward_4bit          load the frozen reward model in 4-bit NF4
    lora_r, lora_alpha, seed, and the PPOConfig fields named in PPO_FIELDS

OUT gets {"ok", "loop_s", "step_end_s", "logs", "error", "model_memory_mb", ...}: `loop_s` is the
wall time of `trainer.train()` alone (model loading and trainer construction excluded);
`step_end_s` the time at the end of each PPO step, measured from the start of train().
A failure is recorded with its error text rather than raised, so the parent can report it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PPO_FIELDS = ("total_episodes", "per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches",
              "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length", "temperature",
              "learning_rate", "kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
              "missing_eos_penalty", "whiten_rewards", "weight_decay", "adam_epsilon")


def import_libraries():
    """What every run imports: the baseline process stops here."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from datasets import Dataset  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401
    from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401


def quantization():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def step_clock(callback_class: type) -> tuple[object, list[float], list[dict]]:
    """(callback, step end times, log rows): a transformers `TrainerCallback` (`callback_class`, passed in so this
    module imports no library at load) recording when each optimizer step ends, in seconds from the start of
    train(), and every logged number."""
    steps: list[float] = []
    log_rows: list[dict] = []
    t_start = [0.0]

    class Clock(callback_class):
        def on_train_begin(self, *a, **k):
            t_start[0] = time.time()

        def on_step_end(self, *a, **k):
            steps.append(time.time() - t_start[0])

        def on_log(self, args, state, control, logs=None, **k):
            log_rows.append({key: float(v) for key, v in (logs or {}).items() if isinstance(v, (int, float))})

    return Clock(), steps, log_rows


def run(spec: dict, out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["sft_path"], padding_side="left")
    pad = tokenizer.pad_token_id
    lora = dict(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, target_modules="all-linear")
    q4 = {"quantization_config": quantization(), "device_map": {"": "cpu"}}

    def causal(four_bit: bool):
        m = AutoModelForCausalLM.from_pretrained(spec["sft_path"], dtype=torch.float32, **(q4 if four_bit else {}))
        m.config.pad_token_id = pad
        return m

    def scorer(four_bit: bool):
        m = AutoModelForSequenceClassification.from_pretrained(spec["rm_path"], num_labels=1, dtype=torch.float32,
                                                               **(q4 if four_bit else {}))
        m.config.pad_token_id = pad
        return m

    policy = causal(spec["policy_4bit"])
    ref = None if spec["policy_4bit"] else causal(False)
    value = scorer(spec["value"] == "qlora")
    if spec["value"] == "qlora":  # a LoRA critic on a 4-bit copy: the head trains in full (modules_to_save)
        value = get_peft_model(value, LoraConfig(task_type="SEQ_CLS", modules_to_save=["score"], **lora))
    reward = scorer(spec["reward_4bit"])
    peft_config = LoraConfig(task_type="CAUSAL_LM", **lora) if spec["policy_4bit"] else None

    args = PPOConfig(
        output_dir=out_dir, seed=spec["seed"], stop_token="eos", num_sample_generations=0, save_strategy="no",
        report_to=[], logging_steps=1, bf16=False, fp16=False, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, **{k: spec[k] for k in PPO_FIELDS},
    )
    train = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    clock, steps, log_rows = step_clock(TrainerCallback)

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=train, value_model=value, peft_config=peft_config, callbacks=[clock])
    models = [trainer.model, trainer.reward_model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    memory = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**20
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.time()
    trainer.train()
    loop_s = time.time() - t0
    return {"ok": True, "loop_s": loop_s, "step_end_s": steps, "logs": log_rows, "model_memory_mb": memory,
            "trainable_params": n_trainable, "episodes": trainer.state.episode, "error": None}


def main(import_libraries=import_libraries, run=run) -> None:
    """The child process's protocol, shared with scripts/bench_trl_critic_free.py (which passes its own functions):
    `--imports-only`, or SPEC.json OUT.json -> `run(spec, out_dir)`'s record with its time and peak RSS."""
    import resource

    if sys.argv[1:] == ["--imports-only"]:
        import_libraries()
        return
    spec_path, out_path = sys.argv[1:3]
    spec = json.loads(open(spec_path).read())
    t0 = time.time()
    try:
        import_libraries()
        result = run(spec, os.path.join(os.path.dirname(out_path), "trl_output"))
    except Exception as exc:  # recorded, not hidden: the parent puts the text in the report
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    result["process_s"] = time.time() - t0
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(out_path, "w") as f:
        json.dump(result, f)
    if not result["ok"]:
        print(result["traceback"], file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
