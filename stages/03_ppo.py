"""Stage 03: PPO (or a critic-free estimator) on one 4-bit base; reward = RM score − toxicity penalty − KL penalty.

    python stages/03_ppo.py --config configs/demo/ppo.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml stages/03_ppo.py --config ...
    torchrun --nproc_per_node 2 stages/03_ppo.py --config ...

The SFT model is loaded once (NF4) and carries the policy, value and reward
adapters; the reference is the base with adapters disabled (rlhf/ppo/actor_critic.py).
Each step: sample `num_generations` responses for each of a batch of prompts, score them, turn
scores and per-token KL into rewards, estimate advantages (`advantage_estimator`), then run
`num_ppo_epochs` passes of clipped policy (and value) updates over `num_mini_batches` minibatches.
Option names follow TRL 1.12's PPOConfig, and TRL's GRPOConfig for what GRPO adds.

advantage_estimator (rlhf/ppo/estimators.py):
    gae                  PPO with a critic: value adapter + head, GAE (the default)
    grpo, dr_grpo, rloo  a response against the other responses to its prompt (num_generations >= 2)
    reinforce_pp         REINFORCE++: returns whitened over the global batch
    reinforce_baseline   REINFORCE++ with the group mean as baseline (num_generations >= 2)
The critic-free ones build, run, save and register no value adapter or head.

Batch sizes (per process unless "global"):

    per_device_train_batch_size   rows in one forward/backward of the update (micro-batch)
    gradient_accumulation_steps   micro-batches summed into one optimizer step
    local_mini_batch_size       = per_device_train_batch_size × gradient_accumulation_steps
    num_mini_batches              optimizer steps per PPO epoch
    local_batch_size            = local_mini_batch_size × num_mini_batches   (responses sampled per step)
    num_generations               responses per prompt (k); local_batch_size must be a multiple of it
    local prompts per step      = local_batch_size / num_generations
    batch_size (global)         = local_batch_size × world_size              (episodes = responses)
    num_total_batches           = ceil(total_episodes / batch_size)          (steps)

Every size is a product of the options, so minibatches always split a rollout batch exactly and a
prompt's k responses are sampled together on one process (minibatches then mix the groups: the
advantages are computed before the update); only the number of steps rounds (up) when
total_episodes is not a multiple of batch_size.
    local_rollout_forward_batch_size  rows per no-grad forward during the rollout

Per response: score = (RM − reward_mean) / reward_std (stats from the reward entry),
reward = score − toxicity_coef · toxicity − missing_eos_penalty (if no EOS), placed
at the last real token, plus −β·KL on every token (or β·KL as a loss term: `kl_in_loss`).
β is fixed or adaptive (Ziegler et al.); with `toxicity_budget` set, toxicity_coef is a
Lagrange multiplier. `reward_funcs` adds user functions (TRL's reward-function signature),
each with a weight (`reward_weights`); see rlhf/ppo/rewards.py.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.config import StageConfig, _help, check_positive, parse_config  # noqa: E402
from rlhf.errors import ConfigError, run_cli  # noqa: E402


@dataclass
class PPOStageConfig(StageConfig):
    """Stage 03: PPO of the SFT model against the reward model and the toxicity scorer."""

    sft_model: str = _help("Policy's starting point and the shared base: registry ref, folder or hub id.", default="sft:latest")
    reward_model: str = _help("Reward entry (reward:latest / reward:<id>).", default="reward:latest")
    data: str = _help("Prompts (`prompt` schema): file or hub dataset id.", default="")
    data_split: str = _help("Split to read when `data` is a hub dataset.", default="train")
    load_in_4bit: bool = _help("Load the shared base in 4-bit NF4 (false: full precision, same code).", default=True)
    lora_r: int = _help("LoRA rank of the policy (and of a fresh value adapter).", default=16)
    advantage_estimator: str = _help("gae (PPO with a critic) | grpo | dr_grpo | rloo | reinforce_pp | "
                                     "reinforce_baseline: the last five build no critic (rlhf/ppo/estimators.py).",
                                     default="gae")
    num_generations: int = _help("Responses sampled per prompt (k), together in one batch; grpo, dr_grpo, rloo and "
                                 "reinforce_baseline compare a prompt's k responses (k >= 2).", default=1)
    value_lora_r: int | None = _help("LoRA rank of the value adapter. Unset: a copy of the reward adapter (its rank) "
                                     "when the reward model shares the base, else lora_r. Above the reward adapter's "
                                     "rank: that copy widened with new directions (the critic still starts as the RM).",
                                     default=None)
    lora_alpha: int = _help("LoRA alpha.", default=32)
    lora_target_modules: str = _help("'all-linear' or comma-separated module names.", default="all-linear")
    total_episodes: int = _help("Responses sampled over the whole run (global).", default=2048)
    per_device_train_batch_size: int = _help("Micro-batch rows per forward/backward in the update.", default=8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    num_mini_batches: int = _help("Optimizer steps per PPO epoch over one rollout batch.", default=2)
    num_ppo_epochs: int = _help("Passes over each rollout batch.", default=2)
    local_rollout_forward_batch_size: int = _help("Rows per no-grad forward during the rollout.", default=32)
    group_by_length: bool = _help("Cut rollout chunks and update micro-batches from rows sorted by length, so "
                                  "short rows are not padded to the longest (same results up to float rounding; "
                                  "pays off most with several micro-batches per minibatch).", default=True)
    fuse_roles: bool = _help("Run the roles that read the same rows in one forward, each row copy through its own "
                             "adapter: reference+value+reward in the rollout, policy+value in the update. Same "
                             "results up to float rounding, checked on a probe batch at start (if they differ, one "
                             "forward per role, said in the log). Pays with small chunks (micro-batches and rollout chunks "
                             "of a few rows); with large ones the extra copies cost more than it saves "
                             "(docs/BENCHMARKS.md).",
                             default=False)
    max_prompt_length: int = _help("Prompts keep their last N tokens.", default=128)
    response_length: int = _help("Maximum new tokens per response.", default=32)
    temperature: float = _help("Sampling temperature (also applied to the logits used for logprobs).", default=1.0)
    learning_rate: float = _help("AdamW learning rate (linear decay to 0).", default=3e-4)
    vf_learning_rate: float | None = _help("Learning rate of the value adapter and head (OpenRLHF's "
                                           "critic_learning_rate); unset: learning_rate.", default=None)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    kl_coef: float = _help("β: KL penalty coefficient (initial value when adaptive).", default=0.05)
    kl_estimator: str = _help("k1 (log ratio), k2 (½·log ratio², low variance) or k3 (Schulman's unbiased, "
                              "non-negative; GRPO's in the loss).", default="k1")
    kl_in_loss: bool = _help("Add β·KL (kl_estimator, per token) to the policy loss instead of −β·KL to the rewards "
                             "(GRPO's way).", default=False)
    loss_type: str = _help("How the policy loss is averaged over a minibatch (TRL GRPOConfig's names): dapo (every "
                           "token the same), grpo (every response the same), dr_grpo (÷ rows × response_length).",
                           default="dapo")
    adaptive_kl: bool = _help("Adapt β toward `kl_target` (Ziegler et al. 2019).", default=False)
    kl_target: float = _help("Target KL (nats per response) of the adaptive controller.", default=2.0)
    kl_horizon: int = _help("Horizon (episodes) of the adaptive controller.", default=10000)
    kl_ceiling: float = _help("Stop early when mean KL per response exceeds this (nats).", default=50.0)
    cliprange: float = _help("ε of the clipped policy objective.", default=0.2)
    cliprange_value: float = _help("ε of the clipped value loss.", default=0.2)
    vf_coef: float = _help("Weight of the value loss.", default=0.1)
    gamma: float = _help("Discount γ.", default=1.0)
    lam: float = _help("GAE λ.", default=0.95)
    whiten_rewards: bool = _help("Whiten per-token rewards before GAE.", default=False)
    missing_eos_penalty: float = _help("Subtracted from the score of a response cut off without EOS.", default=1.0)
    toxicity: str = _help("Toxicity scorer spec (rlhf.safety): auto, profanity-check, detoxify:NAME or path.", default="auto")
    reward_funcs: list[str] = _help("The reward's components: rm, toxicity, and your own functions as module:function "
                                    "or path/file.py:function with TRL's signature (prompts, completions, **kwargs) -> "
                                    "list of floats (rlhf/ppo/rewards.py). Each is logged as objective/reward/<name>.",
                                    default_factory=lambda: ["rm", "toxicity"])
    reward_weights: list[float] | None = _help("One weight per reward_funcs entry (unset: 1 each); toxicity's multiplies "
                                               "−toxicity_coef.", default=None)
    multi_objective_aggregation: str = _help("sum_then_normalize (the estimator normalizes the weighted sum) or "
                                             "normalize_then_sum (each component standardized within its prompt's "
                                             "group, over the batch when num_generations is 1, then summed).",
                                             default="sum_then_normalize")
    toxicity_coef: float = _help("Weight of toxicity in the reward (initial multiplier in constrained mode).", default=2.0)
    toxicity_budget: float | None = _help("Constrained mode: keep mean toxicity under this (Lagrange multiplier).", default=None)
    toxicity_lr: float = _help("Constrained mode: multiplier learning rate.", default=1.0)
    toxicity_coef_max: float = _help("Constrained mode: multiplier upper bound.", default=20.0)
    logging_steps: int = _help("Print a progress line every N PPO steps (metrics.jsonl gets every step).", default=1)
    sample_steps: int = _help("Log a few sample responses every N PPO steps.", default=10)
    save_steps: int = _help("Checkpoint every N PPO steps (for --resume); the policy adapter of each is kept as a "
                            "snapshot for stage 04's reward–KL frontier.", default=10)
    max_policy_snapshots: int = _help("Policy snapshots the entry keeps (snapshots/step-N/policy), evenly spread over "
                                      "the run; 0: none.", default=10)
    dequantize_for_generation: bool | None = _help(
        "Generation computes the 4-bit base's layers with weights dequantized once per rollout instead of at every "
        "token: the same tokens, for a full-precision copy of the base's linear weights while generating. Unset "
        "(null): on the CPU, where bitsandbytes dequantizes at every call, if the copy takes at most a quarter of "
        "the memory available; off on GPUs, where its 4-bit kernels do not. The log says which and why.",
        default=None)
    cpu_mmap_threshold_mb: float = _help("glibc: CPU tensors of at least this many MiB go back to the system when freed "
                                         "during loading and the update (lower peak memory); 0: glibc's default "
                                         "(rlhf.quant.FreedMemory).", default=4.0)
    trust_remote_code: bool = _help("Allow model code from the hub (only for models you trust).", default=False)

    def validate(self) -> None:
        super().validate()
        self.require("data")
        if self.max_policy_snapshots < 0:
            raise ConfigError(f"max_policy_snapshots must be >= 0, got {self.max_policy_snapshots}")
        check_positive(self, "total_episodes", "per_device_train_batch_size", "gradient_accumulation_steps",
                       "num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length",
                       "temperature", "learning_rate", "lora_r", "save_steps", "logging_steps", "sample_steps")
        if self.value_lora_r is not None and self.value_lora_r <= 0:
            raise ConfigError(f"value_lora_r must be a positive integer (or unset), got {self.value_lora_r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ConfigError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        self.validate_estimator()
        if self.vf_learning_rate is not None and not self.vf_learning_rate > 0:
            raise ConfigError(f"vf_learning_rate must be > 0 (or unset to use learning_rate), got {self.vf_learning_rate}")
        if not 0 <= self.cpu_mmap_threshold_mb <= 32:
            raise ConfigError(f"cpu_mmap_threshold_mb must be in [0, 32] (glibc's range; 0 = its default), "
                              f"got {self.cpu_mmap_threshold_mb}")
        if self.toxicity_budget is not None and not 0 <= self.toxicity_budget <= 1:
            raise ConfigError(f"toxicity_budget must be in [0, 1], got {self.toxicity_budget}")
        if self.toxicity_budget is not None and "toxicity" not in self.reward_funcs:
            raise ConfigError("toxicity_budget constrains the toxicity component: add toxicity to reward_funcs")

    @property
    def critic(self) -> bool:
        return self.advantage_estimator == "gae"

    def validate_estimator(self) -> None:
        """The estimator, its group size and the settings that only a critic reads."""
        from rlhf.ppo.estimators import ESTIMATORS, GROUP_ESTIMATORS
        from rlhf.ppo.losses import LOSS_TYPES
        from rlhf.ppo.rewards import AGGREGATIONS

        if self.advantage_estimator not in ESTIMATORS:
            raise ConfigError(f"advantage_estimator must be one of {', '.join(ESTIMATORS)}, "
                              f"got {self.advantage_estimator!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)} (TRL's names; the others change "
                              f"the surrogate itself), got {self.loss_type!r}")
        if self.multi_objective_aggregation not in AGGREGATIONS:
            raise ConfigError(f"multi_objective_aggregation must be one of {', '.join(AGGREGATIONS)}, "
                              f"got {self.multi_objective_aggregation!r}")
        check_positive(self, "num_generations")
        if self.advantage_estimator in GROUP_ESTIMATORS and self.num_generations < 2:
            raise ConfigError(f"advantage_estimator {self.advantage_estimator} compares the responses to one prompt "
                              f"with each other: set num_generations to 2 or more (got {self.num_generations})")
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches
        if local % self.num_generations:
            raise ConfigError(f"num_generations ({self.num_generations}) must divide the responses sampled per step "
                              f"and process, per_device_train_batch_size × gradient_accumulation_steps × "
                              f"num_mini_batches = {self.per_device_train_batch_size} × "
                              f"{self.gradient_accumulation_steps} × {self.num_mini_batches} = {local}, so that every "
                              f"prompt's group is whole")
        if not self.critic:
            for name in ("value_lora_r", "vf_learning_rate"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is set, but advantage_estimator {self.advantage_estimator} has no "
                                      f"critic; unset it, or use advantage_estimator gae")
            if self.whiten_rewards:
                raise ConfigError(f"whiten_rewards applies to gae only; advantage_estimator "
                                  f"{self.advantage_estimator} normalizes in its own way (rlhf/ppo/estimators.py)")


@dataclass
class Sizes:
    world_size: int
    local_mini_batch_size: int
    local_batch_size: int  # responses per step on one process
    batch_size: int  # responses per step over every process
    num_total_batches: int
    num_generations: int = 1

    @property
    def local_prompts(self) -> int:
        return self.local_batch_size // self.num_generations

    @property
    def prompts(self) -> int:
        return self.batch_size // self.num_generations


def derive_sizes(cfg: PPOStageConfig, world_size: int) -> Sizes:
    """The derived batch sizes of the module docstring (divisions must be exact)."""
    local_mini = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    local_batch = local_mini * cfg.num_mini_batches
    batch = local_batch * world_size
    return Sizes(world_size, local_mini, local_batch, batch, math.ceil(cfg.total_episodes / batch),
                 cfg.num_generations)


def update_settings(cfg: PPOStageConfig, sizes: Sizes) -> Any:
    from rlhf.ppo.update import UpdateSettings

    return UpdateSettings(
        num_ppo_epochs=cfg.num_ppo_epochs, local_batch_size=sizes.local_batch_size,
        local_mini_batch_size=sizes.local_mini_batch_size, micro_batch_size=cfg.per_device_train_batch_size,
        world_size=sizes.world_size, temperature=cfg.temperature, cliprange=cfg.cliprange,
        cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm,
        group_by_length=cfg.group_by_length, loss_type=cfg.loss_type, kl_estimator=cfg.kl_estimator,
        response_length=cfg.response_length)


@dataclass
class Inputs:
    """What the run reads: the SFT base, the reward entry (and whether it is an adapter on that base), the prompts,
    the toxicity scorer and the reward's components."""

    sft: Any  # rlhf.models.ResolvedModel
    rm_entry: Any  # rlhf.registry.Entry
    shares_base: bool
    prompts: list[dict]
    skipped: int  # invalid prompt records dropped (on_invalid: skip)
    scorer: Any  # rlhf.safety.ToxicityScorer, chosen once: it never switches during the run
    data_fingerprints: dict[str, str]
    reward_funcs: list  # rlhf.ppo.rewards.RewardFunc, config order

    @property
    def reward_mean(self) -> float:  # the reward entry's statistics on its data: PPO's score is (RM − mean) / std
        return float(self.rm_entry.metrics.get("reward_mean", 0.0))

    @property
    def reward_std(self) -> float:
        return float(self.rm_entry.metrics.get("reward_std", 1.0)) or 1.0


def check_inputs(cfg: PPOStageConfig, registry: Any) -> Inputs:
    """Resolve the SFT base and the reward entry, read the prompts, load the toxicity scorer; refuse settings the
    models cannot satisfy before anything loads."""
    from rlhf.data import fingerprint
    from rlhf.models import model_positions, resolve_model
    from rlhf.ppo.actor_critic import adapter_rank
    from rlhf.ppo.rewards import load_reward_funcs
    from rlhf.reward_model import adapter_dir
    from rlhf.safety import load_scorer
    from rlhf.stage import read_data

    reward_funcs = load_reward_funcs(cfg.reward_funcs, cfg.reward_weights)
    sft = resolve_model(cfg.sft_model, registry, stages=("sft", "pretrain"))
    rm_entry = registry.get(cfg.reward_model, stage="reward")
    positions = model_positions(sft.path, cfg.trust_remote_code)
    if positions and cfg.max_prompt_length + cfg.response_length > positions:
        raise ConfigError(f"max_prompt_length ({cfg.max_prompt_length}) + response_length ({cfg.response_length}) "
                          f"= {cfg.max_prompt_length + cfg.response_length} tokens, but {cfg.sft_model} has "
                          f"{positions} positions; lower one of them")
    shares_base = (rm_entry.config.get("reward_kind") == "adapter"
                   and rm_entry.config.get("base_model") in {sft.ref, sft.entry.ref if sft.entry else None})
    if shares_base and cfg.critic and cfg.value_lora_r is not None:
        rank = adapter_rank(adapter_dir(rm_entry.path))
        if cfg.value_lora_r < rank:
            raise ConfigError(f"value_lora_r ({cfg.value_lora_r}) is below the rank of {rm_entry.ref}'s adapter "
                              f"({rank}): the value adapter starts as a copy of it; use at least that rank, or "
                              f"leave value_lora_r unset")
    prompts, skipped = read_data("ppo", cfg.data, "prompt", split=cfg.data_split, on_invalid=cfg.on_invalid)
    return Inputs(sft, rm_entry, shares_base, prompts=prompts, skipped=skipped, scorer=load_scorer(cfg.toxicity),
                  data_fingerprints={"data": fingerprint(cfg.data, cfg.data_split)}, reward_funcs=reward_funcs)


def build_models(cfg: PPOStageConfig, inputs: Inputs, registry: Any, dev: Any) -> tuple[Any, Any, Any]:
    """(tokenizer, actor-critic, separate reward scorer or None): one base for the four roles, logged."""
    from rlhf.models import load_tokenizer
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.quant import available_memory_mb, choose_dequantize_for_generation, dequantized_4bit_mb
    from rlhf.stage import log

    tokenizer = load_tokenizer(inputs.sft.path, cfg.trust_remote_code)
    separate = None
    if not inputs.shares_base:
        from rlhf.reward_scoring import load_reward_scorer

        separate = load_reward_scorer(inputs.rm_entry, registry, max_length=cfg.max_prompt_length + cfg.response_length,
                                      batch_size=cfg.local_rollout_forward_batch_size,
                                      trust_remote_code=cfg.trust_remote_code)
        log(f"[ppo] reward model {inputs.rm_entry.ref} is not an adapter on {inputs.sft.ref}: loaded separately")
    ac = build_actor_critic(
        inputs.sft.path, tokenizer, load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_target_modules=cfg.lora_target_modules, reward_dir=inputs.rm_entry.path if inputs.shares_base else None,
        separate_reward=separate, device=dev, value_lora_r=cfg.value_lora_r, trust_remote_code=cfg.trust_remote_code,
        fuse_roles=cfg.fuse_roles, critic=cfg.critic)
    copy_mb = dequantized_4bit_mb(ac.model)
    ac.dequantize_for_generation, why = choose_dequantize_for_generation(
        cfg.dequantize_for_generation, dev.type, copy_mb, available_memory_mb())
    if cfg.load_in_4bit:
        log(f"[ppo] generation on weights dequantized once per rollout (+{copy_mb:.0f} MiB while generating; {why})"
            if ac.dequantize_for_generation else f"[ppo] generation on the 4-bit weights ({why})")
    if ac.unfused_reason is None:
        rollout_roles = "+".join(r or "reference" for r in ac.rollout_roles())
        log(f"[ppo] roles fused: {rollout_roles} in the rollout, "
            + ("policy+value in the update" if ac.critic else "the policy alone in the update"))
    else:
        log(f"[ppo] one forward per role ({ac.unfused_reason})")
    return tokenizer, ac, separate


def build_optimizer(cfg: PPOStageConfig, ac: Any, sizes: Sizes) -> tuple[Any, Any, list]:
    """(optimizer, scheduler, trainable params): AdamW with the critic's own learning rate, linear decay to 0."""
    import torch

    named = ac.trainable_named_parameters()
    critic = [p for n, p in named if ".policy." not in n]  # value adapter and value head (none: critic-free)
    groups = [{"params": [p for n, p in named if ".policy." in n], "lr": cfg.learning_rate}]
    if critic:
        groups.append({"params": critic,
                       "lr": cfg.vf_learning_rate if cfg.vf_learning_rate is not None else cfg.learning_rate})
    optimizer = torch.optim.AdamW(groups, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / sizes.num_total_batches))
    return optimizer, scheduler, [p for _, p in named]


def build_controllers(cfg: PPOStageConfig) -> dict[str, Any]:
    """The KL coefficient β (fixed or adaptive) and the toxicity coefficient (fixed or a Lagrange multiplier)."""
    from rlhf.ppo.controllers import AdaptiveKLController, FixedKLController, LagrangeController

    kl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
          else FixedKLController(cfg.kl_coef))
    toxicity = (LagrangeController(cfg.toxicity_coef, cfg.toxicity_budget, cfg.toxicity_lr, cfg.toxicity_coef_max)
                if cfg.toxicity_budget is not None else FixedKLController(cfg.toxicity_coef))
    return {"kl": kl, "toxicity": toxicity}


def score_responses(cfg: PPOStageConfig, inputs: Inputs, batch: Any, texts: list[str], records: list[dict],
                    separate: Any, toxicity_coef: float, world: int) -> Any:
    """The reward's components for each response of `batch` (`records`: its prompt records, one per row) and
    their total (rlhf.ppo.rewards.sequence_rewards)."""
    import torch

    from rlhf.ppo.rewards import call_reward_func, rm_score, sequence_rewards

    dev = batch.responses.device
    messages = [r["messages"] for r in records]
    if separate is not None:
        batch.rm_scores = torch.tensor(separate.raw(messages, texts), dtype=torch.float32, device=dev)
    components = {"rm": rm_score(batch.rm_scores, inputs.reward_mean, inputs.reward_std),
                  "toxicity": torch.tensor(inputs.scorer.score(texts), dtype=torch.float32, device=dev)}
    user = [f for f in inputs.reward_funcs if f.fn is not None]
    if user:  # what TRL's reward functions get besides prompts and completions
        ids = [row[m.bool()].tolist() for row, m in zip(batch.responses.cpu(), batch.mask.cpu())]
        columns = {k: [r.get(k) for r in records] for k in records[0] if k != "messages"}
        components.update({f.name: call_reward_func(f, messages, texts, ids, columns).to(dev) for f in user})
    coefficients = {f.name: f.weight * (-toxicity_coef if f.name == "toxicity" else 1.0) for f in inputs.reward_funcs}
    return sequence_rewards(components, coefficients, batch.has_eos, missing_eos_penalty=cfg.missing_eos_penalty,
                            aggregation=cfg.multi_objective_aggregation, group_size=cfg.num_generations,
                            world_size=world)


def advantage_targets(cfg: PPOStageConfig, batch: Any, rewards: Any, kl_coef: float, world: int) -> Any:
    """Per-token KL, rewards and advantages (and returns, with a critic) of the configured estimator; β goes into
    the rewards unless the KL is a loss term (`kl_in_loss`)."""
    from rlhf.ppo.rewards import critic_free_targets, gae_targets

    beta = 0.0 if cfg.kl_in_loss else kl_coef
    if cfg.critic:
        return gae_targets(rewards.total, batch.logprobs, batch.ref_logprobs, batch.values, batch.mask, kl_coef=beta,
                           kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, lam=cfg.lam,
                           whiten_rewards=cfg.whiten_rewards, world_size=world)
    return critic_free_targets(rewards.total, batch.logprobs, batch.ref_logprobs, batch.mask,
                               estimator=cfg.advantage_estimator, group_size=cfg.num_generations, kl_coef=beta,
                               kl_estimator=cfg.kl_estimator, gamma=cfg.gamma, world_size=world)


def on_interrupt() -> dict[str, int | None]:
    """Ctrl-C (SIGINT) during the loop: the step in progress ends, every process saves a checkpoint and exits 130
    (the returned dict's "signal" is set). A second Ctrl-C stops at once, as Python does by default."""
    stop: dict[str, int | None] = {"signal": None}

    def handler(signum: int, frame: Any) -> None:
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, handler)
    return stop


def tensorboard_writer(work_dir: Path) -> Any:
    """TensorBoard events go with the entry (`finish` copies them): tensorboard --logdir runs."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(work_dir / "tensorboard"))


def log_step(metrics: dict, texts: list[str], rewards: Any, step: int, cfg: PPOStageConfig, writer: Any, bar: Any,
             metrics_path: Path) -> None:
    """Process 0: the metrics line, TensorBoard scalars, the progress bar, and every `sample_steps` a few samples."""
    from rlhf.stage import log

    with metrics_path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    bar.set_postfix({"score": f"{metrics['objective/score']:.2f}", "tox": f"{metrics['objective/toxicity']:.2f}",
                     "kl": f"{metrics['objective/kl']:.2f}"})
    if step % cfg.sample_steps == 0:
        samples = list(zip(texts, rewards.score.tolist(), rewards.toxicity.tolist()))[:3]
        with bar.external_write_mode(file=sys.stderr):  # above the progress bar, not on its line
            for t, s, x in samples:
                log(f"[ppo] sample (score {s:+.2f}, toxicity {x:.2f}): {t[:120]!r}")
        writer.add_text("samples", "\n\n".join(f"score {s:+.2f}, toxicity {x:.2f}: {t}" for t, s, x in samples), step)


def entry_config(cfg: PPOStageConfig, inputs: Inputs, ac: Any, sizes: Sizes) -> dict[str, Any]:
    """What the entry records beyond the config: resolved inputs, the scorer, how the base was loaded."""
    return {"sft_model": inputs.sft.entry.ref if inputs.sft.entry else cfg.sft_model,
            "reward_model": inputs.rm_entry.ref, "toxicity_scorer": inputs.scorer.describe(),
            "reward_shares_base": inputs.shares_base, "data_skipped": {"data": inputs.skipped},
            "critic": ac.critic, "reward_components": [f.describe() for f in inputs.reward_funcs],
            "base_loading": {"load_in_4bit": cfg.load_in_4bit, "quant_type": "nf4" if cfg.load_in_4bit else None,
                             "compute_dtype": str(ac.model.dtype) if hasattr(ac.model, "dtype") else None},
            "world_size": sizes.world_size, "batch_size": sizes.batch_size}


def save_policy(run: Any, ac: Any, tokenizer: Any, metrics_path: Path, max_snapshots: int) -> Path:
    """Stage the entry's files: policy and value adapters, value head (with a critic), per-step metrics, tokenizer,
    and up to `max_snapshots` policy snapshots (rlhf.ppo.checkpoint.thin_snapshots)."""
    import shutil

    from safetensors.torch import save_file

    from rlhf.ppo.checkpoint import thin_snapshots

    staged = run.registry.staging_dir("ppo")
    for snap in thin_snapshots(run.work_dir, max_snapshots):
        shutil.copytree(snap, staged / "snapshots" / snap.name)
    ac.model.save_pretrained(str(staged), selected_adapters=["policy", "value"] if ac.critic else ["policy"])
    if ac.critic:
        save_file({k: v.detach().cpu().contiguous() for k, v in ac.value_head.state_dict().items()},
                  str(staged / "value_head.safetensors"))
    shutil.copy(metrics_path, staged / "metrics.jsonl")
    tokenizer.save_pretrained(staged)
    return staged


def main(cfg: PPOStageConfig) -> None:
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    from rlhf.generation import encode_prompts
    from rlhf.models import memory_footprint_mb, stop_token_ids
    from rlhf.ppo.checkpoint import load_checkpoint, resume_metrics_log, save_checkpoint, save_policy_snapshot
    from rlhf.ppo.controllers import LagrangeController
    from rlhf.ppo.distributed import any_process, mean_over_processes
    from rlhf.ppo.metrics import check_finite, run_summary, step_metrics, training_flags
    from rlhf.ppo.rollout import prompt_indices, rollout
    from rlhf.ppo.update import ppo_update
    from rlhf.quant import FreedMemory
    from rlhf.registry import Registry
    from rlhf.stage import begin, finish, log

    freed_memory = FreedMemory(cfg.cpu_mmap_threshold_mb)  # before loading: the load's fp32 copies go back too
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dev, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    sizes = derive_sizes(cfg, world)

    # 1. Inputs: SFT base, reward entry, prompts, toxicity scorer.
    registry = Registry(cfg.registry)
    inputs = check_inputs(cfg, registry)
    sft, rm_entry, scorer, k = inputs.sft, inputs.rm_entry, inputs.scorer, cfg.num_generations
    run = begin("ppo", cfg, {**inputs.data_fingerprints, "sft": sft.entry.ref if sft.entry else cfg.sft_model,
                             "reward": rm_entry.ref, "toxicity": scorer.spec})
    if run.reused:
        return

    # 2. Models (one base, four roles; three without a critic), optimizer, KL and toxicity coefficients.
    tokenizer, ac, separate = build_models(cfg, inputs, registry, dev)
    footprint = memory_footprint_mb(ac)
    log(f"[ppo] {cfg.advantage_estimator}: one base ({'4-bit NF4' if cfg.load_in_4bit else 'full precision'}) for "
        f"policy/ref/{'value/' if ac.critic else ''}reward: model memory {footprint:.1f} MiB; toxicity scorer "
        f"{scorer.spec}; world size {world}; {sizes.num_total_batches} steps of {sizes.batch_size} episodes"
        + (f" ({sizes.prompts} prompts × {k})" if k > 1 else ""))
    optimizer, scheduler, params = build_optimizer(cfg, ac, sizes)
    controllers = build_controllers(cfg)
    kl_ctl, tox_ctl = controllers["kl"], controllers["toxicity"]
    settings = update_settings(cfg, sizes)

    # 3. Resume: trainable tensors, optimizer, scheduler, controllers, RNG, step and the metrics log.
    metrics_path = run.work_dir / "metrics.jsonl"
    ckpt = run.last_checkpoint() if cfg.resume else None
    start_step = 0
    if ckpt is not None:
        start_step = load_checkpoint(Path(ckpt), ac, optimizer, scheduler, controllers, rank=rank,
                                     world_size=world)["step"]
        log(f"[ppo] resumed at step {start_step}")
    history = resume_metrics_log(metrics_path, start_step, rank)  # per-step metrics, resumed steps included
    stops = stop_token_ids(ac.model, tokenizer)  # the end of a turn first, then the model's own stop tokens
    encoded = encode_prompts(tokenizer, [p["messages"] for p in inputs.prompts], cfg.max_prompt_length)
    stop = on_interrupt()

    # 4. The loop: rollout -> rewards -> advantages -> update -> log -> checkpoint.
    writer = tensorboard_writer(run.work_dir) if rank == 0 else None
    bar = tqdm(range(start_step, sizes.num_total_batches), initial=start_step, total=sizes.num_total_batches,
               desc="ppo", disable=rank != 0)
    for step in bar:
        t0 = time.time()
        idx = [i for i in prompt_indices(step, rank, batch_size=sizes.prompts, local_batch_size=sizes.local_prompts,
                                         n_prompts=len(encoded), seed=cfg.seed) for _ in range(k)]  # k in a row
        freed_memory.rollout()
        batch = rollout(ac, [encoded[i] for i in idx], pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=stops, temperature=cfg.temperature,
                        response_length=cfg.response_length, forward_batch_size=cfg.local_rollout_forward_batch_size,
                        group_by_length=cfg.group_by_length, device=dev)
        texts = tokenizer.batch_decode(batch.responses, skip_special_tokens=True)
        rewards = score_responses(cfg, inputs, batch, texts, [inputs.prompts[i] for i in idx], separate,
                                  tox_ctl.value, world)
        targets = advantage_targets(cfg, batch, rewards, kl_ctl.value, world)
        t_rollout = time.time() - t0

        t1 = time.time()
        freed_memory.update()
        upd = ppo_update(ac, optimizer, scheduler, params, batch, targets.advantages, targets.returns, settings,
                         step_seed=cfg.seed * 100003 + step, kl_coef_in_loss=kl_ctl.value if cfg.kl_in_loss else 0.0)
        metrics = step_metrics(step + 1, sizes.batch_size, score=rewards.score, toxicity=rewards.toxicity,
                               total=rewards.total, logprobs=batch.logprobs, ref_logprobs=batch.ref_logprobs,
                               kl=targets.kl, mask=batch.mask, values=batch.values, returns=targets.returns,
                               has_eos=batch.has_eos, kl_coef=kl_ctl.value, toxicity_coef=tox_ctl.value, update=upd,
                               rollout_s=t_rollout, update_s=time.time() - t1, components=rewards.components)
        metrics = mean_over_processes(metrics, world, dev)  # every process logs and adapts from the same numbers
        check_finite(metrics, str(run.work_dir))
        kl_seq = mean_over_processes({"kl": (targets.kl * batch.mask).sum(1).mean().item()}, world, dev)["kl"]
        kl_ctl.update(kl_seq, sizes.batch_size)
        if isinstance(tox_ctl, LagrangeController):
            tox_ctl.update(metrics["objective/toxicity"])
        history.append(metrics)
        if rank == 0:
            log_step(metrics, texts, rewards, step + 1, cfg, writer, bar, metrics_path)
        if metrics["objective/kl"] > cfg.kl_ceiling:
            log(f"[ppo] KL {metrics['objective/kl']:.2f} above kl_ceiling {cfg.kl_ceiling}: stopping early")
            break
        stopping = any_process(stop["signal"] is not None, world, dev)  # every process stops after the same step
        if (step + 1) % cfg.save_steps == 0 or stopping:
            saved = save_checkpoint(run.work_dir, ac, optimizer, scheduler, controllers, step + 1, rank=rank,
                                    world_size=world)
            if rank == 0 and cfg.max_policy_snapshots > 0:
                save_policy_snapshot(run.work_dir, ac, step + 1)
        if stopping:
            log(f"[ppo] interrupted: checkpoint at step {step + 1} saved in {saved}; rerun with --resume")
            if writer is not None:
                writer.close()
            raise SystemExit(130)

    # 5. Save the adapters and the metrics, register with parents sft and reward.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C stops at once, nothing registered
    if rank != 0:
        return
    writer.close()
    staged = save_policy(run, ac, tokenizer, metrics_path, cfg.max_policy_snapshots)
    flags = training_flags(history)
    for flag in flags:
        log(f"[ppo] flag: {flag}")
    finish(run, staged, cfg, parents=[*sft.parents, rm_entry.ref],
           metrics={**run_summary(history), "model_memory_mb": footprint}, data_fingerprints=inputs.data_fingerprints,
           extra_config={**entry_config(cfg, inputs, ac, sizes), "training_flags": flags})


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(PPOStageConfig))))
