"""Critic-free estimators: ours (stages/03_ppo.py --advantage_estimator grpo | rloo) beside TRL 1.16's GRPOTrainer
and RLOOTrainer (scripts/bench_trl_critic_free.py, run by this interpreter: the TRL the project installs).

    ESTIMATORS            how each estimator is matched on our side, and what its KL figure measures
    CriticFreeSettings    what both sides get; `ours_cmd` and `trl_spec` spell it in each side's option names
    prompt_order          the prompts ours samples, step by step: the TRL side's dataset, in that order
    ours_series / trl_series   per-step series (a step = one rollout of `batch_size` responses) for bench.stats
    run_ours / run_trl    one child process of each side and its record
    part_critic_free      the part: the tiny trained model (cost and quality) and the GPT-2-small shape (cost)

Both sides start from the same SFT folder in 4-bit NF4 with a LoRA adapter (ours: one base for policy, reference
and reward; TRL: `quantization_config` + `peft_config`, reference = adapter off) and get the same prompts at every
step (TRL reads them unshuffled in the order ours samples them, `prompt_order`, and renders them with the same chat
template: the peer checks the ids match ours), k responses per prompt, response length, learning rate, optimizer
steps and reward. The reward is RM − toxicity_coef·toxicity, no EOS penalty:
TRL's two reward functions compute it with our code (scripts/bench_trl_critic_free.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .harness import baseline
from .runs import Settings, run_peer, run_stage
from .setups import Setup
from .stats import compare

if TYPE_CHECKING:  # pragma: no cover
    from .parts import Bench

PEER_SCRIPT = "scripts/bench_trl_critic_free.py"
BASELINE = "trl116"  # the import-only child of the TRL side: TRL 1.16 and our reward code, in this interpreter

# How each estimator is matched. GRPO: TRL's `beta` is a k3 KL term in the loss, so ours runs `kl_in_loss` with k3,
# and both aggregate the loss with `loss_type` dapo (TRL's default). RLOO: TRL 1.16's RLOOTrainer subtracts
# beta·Σ_t k1 (old policy vs reference, summed over the response) from the reward, as ours does without
# `kl_in_loss`; its loss is per sequence (the ratio of whole-response probabilities, clipped, averaged over the
# responses), which ours does not have: `dr_grpo` (a constant normalizer) weighs the tokens of a response as that
# loss's gradient does, up to a constant factor, and ours clips per token.
ESTIMATORS: dict[str, dict[str, Any]] = {
    "grpo": {"ours": {"advantage_estimator": "grpo", "kl_in_loss": "true", "kl_estimator": "k3", "loss_type": "dapo"},
             "trl": {"trainer": "grpo", "loss_type": "dapo", "scale_rewards": "group"},
             "kl": "k3 per token, at the update (the loss term): ours loss/kl, TRL kl"},
    "rloo": {"ours": {"advantage_estimator": "rloo", "kl_in_loss": "false", "kl_estimator": "k1",
                      "loss_type": "dr_grpo"},
             "trl": {"trainer": "rloo"},
             "kl": "k1 per token, at the rollout (the reward's penalty): ours objective/kl ÷ response/length_mean, "
                   "TRL kl"},
}


@dataclass
class CriticFreeSettings:
    """What both implementations get (ours' option names; `trl_spec` maps them to GRPOConfig / RLOOConfig)."""

    total_episodes: int = 128  # responses over the run
    batch_size: int = 16  # responses per step: batch_size / num_generations prompts
    num_generations: int = 4  # k
    num_mini_batches: int = 2  # optimizer steps per pass over a rollout (TRL: steps_per_generation)
    num_ppo_epochs: int = 2  # passes over a rollout (TRL: num_iterations)
    response_length: int = 32  # TRL: max_completion_length
    learning_rate: float = 3e-4  # linear decay to 0 on both sides
    kl_coef: float = 0.05  # β (TRL: beta)
    cliprange: float = 0.2  # TRL: epsilon
    temperature: float = 1.0
    toxicity_coef: float = 2.0  # our stage's default
    lora_r: int = 16
    lora_alpha: int = 32
    weight_decay: float = 0.01  # torch AdamW's default, which ours uses
    adam_epsilon: float = 1e-5  # ours
    max_grad_norm: float = 1.0  # both clip (ours' default, TRL's Trainer default)
    # Ours only, as in the PPO part: rows per update micro-batch and per rollout forward (the same optimizer steps).
    ours_micro_batch: int = 2
    ours_rollout_chunk: int = 4
    ours_fuse_roles: bool = True
    # TRL only. False: fp32 compute and LoRA weights, no gradient checkpointing, as ours (the same weights and
    # arithmetic). True: GRPOConfig / RLOOConfig's own defaults there: bf16 autocast, gradient checkpointing, and
    # the LoRA weights of a quantized model cast to bf16 (TRL's QLoRA recipe).
    trl_as_shipped: bool = False

    @property
    def steps(self) -> int:
        return math.ceil(self.total_episodes / self.batch_size)

    @property
    def updates_per_step(self) -> int:
        return self.num_mini_batches * self.num_ppo_epochs


def prompt_order(cs: CriticFreeSettings, n_prompts: int, seed: int) -> list[int]:
    """The prompt indices ours samples at each step, in order (`rlhf.ppo.rollout.prompt_indices`, one process): the
    TRL side reads its dataset in this order, unshuffled, so both sides see the same prompts at every step."""
    from rlhf.ppo.rollout import prompt_indices

    per_step = cs.batch_size // cs.num_generations
    return [i for step in range(cs.steps)
            for i in prompt_indices(step, 0, batch_size=per_step, local_batch_size=per_step, n_prompts=n_prompts,
                                    seed=seed)]


def ours_cmd(cs: CriticFreeSettings, setup: Setup, estimator: str, *, sft: str, reward: str, seed: int) -> list[str]:
    """The options of stages/03_ppo.py for these settings and estimator."""
    mini = cs.batch_size // cs.num_mini_batches
    micro = min(cs.ours_micro_batch, mini)
    if mini % micro or cs.batch_size % cs.num_mini_batches:
        raise ValueError(f"batch_size {cs.batch_size} / num_mini_batches {cs.num_mini_batches} / micro-batch {micro}: "
                         f"the minibatch must split exactly")
    opts = {
        "registry": setup.registry, "data": setup.prompts, "sft_model": sft, "reward_model": reward,
        "load_in_4bit": "true", "seed": seed, "total_episodes": cs.total_episodes,
        **ESTIMATORS[estimator]["ours"], "num_generations": cs.num_generations,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": mini // micro,
        "num_mini_batches": cs.num_mini_batches, "num_ppo_epochs": cs.num_ppo_epochs,
        "response_length": cs.response_length, "learning_rate": cs.learning_rate, "kl_coef": cs.kl_coef,
        "cliprange": cs.cliprange, "temperature": cs.temperature, "max_grad_norm": cs.max_grad_norm,
        "missing_eos_penalty": 0, "reward_funcs": "rm,toxicity", "toxicity": "profanity-check",
        "toxicity_coef": cs.toxicity_coef, "lora_r": cs.lora_r, "lora_alpha": cs.lora_alpha,
        "local_rollout_forward_batch_size": cs.ours_rollout_chunk, "group_by_length": "true",
        "fuse_roles": str(cs.ours_fuse_roles).lower(), "save_steps": 10**6, "sample_steps": 10**6,
        "logging_steps": 10**6,
    }
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def trl_spec(cs: CriticFreeSettings, estimator: str, *, sft_path: str, reward_dir: str, prompts: list[list[dict]],
             prompt_ids: list[list[int]], seed: int) -> dict[str, Any]:
    """The TRL side's SPEC (scripts/bench_trl_critic_free.py): the same settings in GRPOConfig / RLOOConfig names.
    `prompts` / `prompt_ids`: the prompts of every step in order (`prompt_order`), read unshuffled. One micro-batch
    per optimizer step (per_device_train_batch_size = the minibatch), as TRL runs best."""
    return {
        **ESTIMATORS[estimator]["trl"], "sft_path": sft_path, "reward_dir": reward_dir, "reward_mean": 0.0,
        "reward_std": 1.0, "toxicity": "profanity-check", "toxicity_coef": cs.toxicity_coef, "prompts": prompts,
        "prompt_ids": prompt_ids, "shuffle_dataset": False, "seed": seed, "lora_r": cs.lora_r,
        "lora_alpha": cs.lora_alpha,
        "as_shipped": cs.trl_as_shipped, "num_generations": cs.num_generations,
        "max_completion_length": cs.response_length,
        "per_device_train_batch_size": cs.batch_size // cs.num_mini_batches, "gradient_accumulation_steps": 1,
        "steps_per_generation": cs.num_mini_batches, "num_iterations": cs.num_ppo_epochs,
        "max_steps": cs.steps * cs.updates_per_step, "learning_rate": cs.learning_rate, "lr_scheduler_type": "linear",
        "beta": cs.kl_coef, "epsilon": cs.cliprange, "temperature": cs.temperature,
        "weight_decay": cs.weight_decay, "adam_epsilon": cs.adam_epsilon, "max_grad_norm": cs.max_grad_norm,
    }


def ours_series(rows: list[dict[str, Any]], estimator: str) -> dict[str, list[float]]:
    """Per-step series from our metrics.jsonl rows; `score` is the normalized RM score (no EOS penalty here), `kl`
    the KL figure of ESTIMATORS[estimator] (per token, as TRL logs it)."""
    if estimator == "grpo":
        kl = [r["loss/kl"] for r in rows]
    else:
        kl = [r["objective/kl"] / max(r["response/length_mean"], 1e-9) for r in rows]
    return {"step_s": [r["timing/rollout_s"] + r["timing/update_s"] for r in rows],
            "rollout_s": [r["timing/rollout_s"] for r in rows], "update_s": [r["timing/update_s"] for r in rows],
            "score": [r["objective/score"] for r in rows], "kl": kl,
            "response_length": [r["response/length_mean"] for r in rows]}


def trl_series(out: dict[str, Any], updates_per_step: int) -> dict[str, list[float]]:
    """Per-step series from the TRL side's OUT: its optimizer steps grouped `updates_per_step` to a rollout; the
    score from the rollout's `rewards/rm_score/mean`, the KL the mean of its steps' `kl` (GRPO logs it at every
    optimizer step, RLOO at the rollout's)."""
    ends = out.get("step_end_s") or []
    starts = [0.0, *ends[:-1]]
    n = len(ends) // updates_per_step
    logs = [r for r in out.get("logs", []) if "entropy" in r]  # one row per optimizer step (logging_steps 1)
    step_s, score, kl, length = [], [], [], []
    for i in range(n):
        lo, hi = i * updates_per_step, (i + 1) * updates_per_step
        step_s.append(ends[hi - 1] - starts[lo])
        group = logs[lo:hi]
        score += [r["rewards/rm_score/mean"] for r in group if "rewards/rm_score/mean" in r]
        length += [r["completions/mean_length"] for r in group if "completions/mean_length" in r]
        kls = [r["kl"] for r in group if "kl" in r]
        kl.append(sum(kls) / len(kls) if kls else float("nan"))
    return {"step_s": step_s, "score": score, "kl": kl, "response_length": length}


def run_ours(cs: CriticFreeSettings, setup: Setup, estimator: str, *, label: str, sft: str, reward: str, seed: int,
             threads: int, work: Path, profile: Path | None = None) -> dict[str, Any]:
    """One run of stages/03_ppo.py with this critic-free estimator."""
    record, rows = run_stage(ours_cmd(cs, setup, estimator, sft=sft, reward=reward, seed=seed), setup, label=label,
                             seed=seed, threads=threads, work=work, profile=profile)
    if rows:
        series = ours_series(rows, estimator)
        record.update(series, loop_s=sum(series["step_s"]), episodes=rows[-1]["episodes"])
    return record


def run_trl(cs: CriticFreeSettings, estimator: str, *, label: str, sft_path: str, reward_dir: str,
            prompts: list[list[dict]], prompt_ids: list[list[int]], seed: int, threads: int,
            work: Path) -> dict[str, Any]:
    """One run of TRL 1.16's GRPOTrainer / RLOOTrainer through scripts/bench_trl_critic_free.py."""
    spec = trl_spec(cs, estimator, sft_path=sft_path, reward_dir=reward_dir, prompts=prompts, prompt_ids=prompt_ids,
                    seed=seed)
    record, out = run_peer(sys.executable, PEER_SCRIPT, spec, label=label, seed=seed, threads=threads, work=work)
    if out:
        series = trl_series(out, cs.updates_per_step)
        record.update(series, loop_s=out["loop_s"], episodes=len(series["step_s"]) * cs.batch_size,
                      model_memory_mb=out["model_memory_mb"], trainable_params=out["trainable_params"],
                      prompt_ids_match=out["prompt_ids_match"])
        if out["prompt_ids_match"] != 1.0:
            record.update(ok=False, error=f"TRL rendered {1 - out['prompt_ids_match']:.1%} of the prompts to other "
                                          f"token ids than ours")
    return record


def _pair(b: Bench, cs: CriticFreeSettings, estimator: str, label: str, model: dict[str, str], seed: int) -> None:
    """Ours, then TRL (unless --skip-peer), with one estimator on one model; each recorded in the report."""
    b.add(run_ours(cs, b.setup, estimator, label=label, sft=model["sft"], reward=model["reward_adapter"], seed=seed,
                   threads=b.args.threads, work=b.args.work), cs.batch_size)
    if not b.args.skip_peer:
        order = prompt_order(cs, len(b.prompt_ids), seed)
        b.add(run_trl(cs, estimator, label=label, sft_path=str(b.registry.get(model["sft"]).path),
                      reward_dir=str(b.registry.get(model["reward_adapter"]).path),
                      prompts=[b.prompt_messages[i] for i in order], prompt_ids=[b.prompt_ids[i] for i in order],
                      seed=seed, threads=b.args.threads, work=b.args.work),
              cs.batch_size, baseline=BASELINE)


def part_critic_free(b: Bench) -> None:
    """GRPO and RLOO, ours beside TRL 1.16, alternating ours / TRL per seed: on the tiny trained model (quality from
    the SFT policy's start score) and on the GPT-2-small shape (cost: the headline ratios, medians over its seeds);
    then, in the full plan, one run of ours under cProfile (GPT-2 small, GRPO)."""
    pl, su = b.pl["critic_free"], b.setup
    if not b.args.skip_peer and BASELINE not in b.base:
        b.base[BASELINE] = baseline(sys.executable, [PEER_SCRIPT, "--imports-only"], BASELINE, b.args.threads,
                                    b.args.work)
    tiny = CriticFreeSettings(total_episodes=pl["episodes"])
    gpt2 = CriticFreeSettings(**pl["gpt2"])
    out = b.report["critic_free"] = {"settings": {"tiny": asdict(tiny), "gpt2_small": asdict(gpt2)},
                                     "kl_figures": {e: m["kl"] for e, m in ESTIMATORS.items()},
                                     "tiny": {}, "gpt2_small": {}}
    start = b.start_score(Settings(response_length=tiny.response_length, temperature=tiny.temperature,
                                   missing_eos_penalty=0.0), four_bit=True, label="critic_free")
    tiny_model = {"sft": su.sft, "reward_adapter": su.reward_adapter}
    for seed in pl["seeds"]:
        for est in ESTIMATORS:
            _pair(b, tiny, est, f"cf_{est}", tiny_model, seed)
    for est in ESTIMATORS:
        out["tiny"][est] = compare(b.pick(f"cf_{est}"), tiny.batch_size, start)
    g = su.synthetic["gpt2_small"]
    for seed in pl["gpt2_seeds"]:
        for est in ESTIMATORS:
            _pair(b, gpt2, est, f"cf_gpt2_{est}", g, seed)
    for est in ESTIMATORS:
        out["gpt2_small"][est] = compare(b.pick(f"cf_gpt2_{est}"), gpt2.batch_size)
    if pl["profile_gpt2"]:
        from .profiling import profile_shares

        path = b.args.work / "profile_cf_gpt2_grpo.prof"
        r = b.add(run_ours(gpt2, su, "grpo", label="profile_cf_gpt2_grpo", sft=g["sft"], reward=g["reward_adapter"],
                           seed=0, threads=b.args.threads, work=b.args.work, profile=path), gpt2.batch_size)
        out["cprofile_gpt2_grpo"] = profile_shares(path) if r["ok"] else None
