"""From a rollout's scores to the update's targets: the reward of each response, per-token rewards, advantages.

    load_reward_funcs(...)   the reward's named components: `rm`, `toxicity`, user `module:function`s
    rm_score(...)            the `rm` component: the raw RM score normalized by the reward entry's statistics
    call_reward_func(...)    one user function on a batch (TRL's signature), checked
    sequence_rewards(...)    per response: total = Σ_i c_i·x_i − missing_eos_penalty·[no EOS]
    gae_targets(...)         per token: rewards = −β·KL, plus `total` at the last real token; GAE advantages
    critic_free_targets(...) advantages of a critic-free estimator (rlhf.ppo.estimators)

The components x_i of a response: `rm` = (RM − reward_mean)/reward_std (the reward entry's statistics on
its data, so 0 is an average response there), `toxicity` = the scorer's probability in [0, 1], and any
user function's value. Their coefficients c_i: the weight (`reward_weights`, 1 by default), and for
`toxicity` minus `toxicity_coef` (the Lagrange multiplier under a budget) times it. With
`multi_objective_aggregation: normalize_then_sum` (TRL's name; GDPO, arXiv:2601.05242) each x_i is first
standardized within its prompt's group of k responses (over the global batch when k = 1), so a
component of large scale cannot drown the others. A user function may return None for a response it
does not apply to: that component then adds nothing to it (TRL's nansum).

Pure functions on tensors and floats (the symbols of `rlhf.ppo.losses`); the stage calls them in
this order every step.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from rlhf.errors import ConfigError, UserError

BUILTIN_COMPONENTS = ("rm", "toxicity")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")  # TRL GRPOConfig.multi_objective_aggregation


@dataclass(frozen=True)
class RewardFunc:
    """One named component of the reward: a built-in (`fn` None) or a user function."""

    name: str  # logged as objective/reward/<name>
    spec: str  # "rm", "toxicity" or "module:function" / "path/file.py:function"
    weight: float
    fn: Callable[..., Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "weight": self.weight}


def _import_function(spec: str, where: str) -> Callable[..., Any]:
    """`module:function` (importable from the working directory or sys.path) or `path/to/file.py:function`."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"{where} = {spec!r}: expected rm, toxicity, module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise ConfigError(f"{where} = {spec!r}: no file {path}")
            loader_spec = importlib.util.spec_from_file_location(f"rlhf_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module: any error is reported with its name
        raise ConfigError(f"{where} = {spec!r}: importing {module_name} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where} = {spec!r}: {module_name} has no function {attr!r}")
    return fn


def load_reward_funcs(specs: list[str], weights: list[float] | None) -> list[RewardFunc]:
    """The reward's components in config order (`reward_funcs`, `reward_weights`); errors name the field."""
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"reward_weights has {len(weights)} values for {len(specs)} reward_funcs; give one weight "
                          f"per function (or none: 1 each)")
    if "rm" not in specs:
        raise ConfigError("reward_funcs must include rm (the reward entry's score; weight 0 leaves it out of the "
                          "sum but keeps objective/score)")
    funcs: list[RewardFunc] = []
    for i, spec in enumerate(specs):
        weight = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(weight):
            raise ConfigError(f"reward_weights[{i}] must be a finite number, got {weights[i]!r}")
        if spec in BUILTIN_COMPONENTS:
            funcs.append(RewardFunc(spec, spec, weight))
            continue
        fn = _import_function(spec, f"reward_funcs[{i}]")
        name = getattr(fn, "__name__", spec.rpartition(":")[2])
        if name in BUILTIN_COMPONENTS:
            raise ConfigError(f"reward_funcs[{i}] = {spec!r}: a function named {name!r} would hide the built-in "
                              f"component of that name; rename the function")
        funcs.append(RewardFunc(name, spec, weight, fn))
    names = [f.name for f in funcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"reward_funcs: two components named {dup[0]!r}; each component needs its own name")
    return funcs


def call_reward_func(func: RewardFunc, prompts: list[list[dict]], completions: list[str],
                     completion_ids: list[list[int]], columns: dict[str, list[Any]]) -> Tensor:
    """(B,) a user function's values with TRL's reward-function signature: `prompts` and `completions` in the
    conversational format (lists of messages; a completion is `[{"role": "assistant", "content": text}]`),
    keyword arguments `completion_ids` and every other field of the prompt records (one list per field).
    None (does not apply to that response) becomes NaN."""
    n = len(completions)
    out = func.fn(prompts=prompts, completions=[[{"role": "assistant", "content": t}] for t in completions],
                  completion_ids=completion_ids, **columns)
    where = f"reward function {func.name} ({func.spec})"
    try:
        values = list(out)
    except TypeError:
        raise UserError(f"{where} returned {type(out).__name__}; expected a list of {n} floats") from None
    if len(values) != n:
        raise UserError(f"{where} returned {len(values)} values for {n} completions; expected one per completion")
    try:
        floats = [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        bad = next(v for v in values if v is not None and not isinstance(v, (int, float)))
        raise UserError(f"{where} returned {bad!r}; expected floats (or None where it does not apply)") from None
    if any(math.isinf(v) for v in floats):
        raise UserError(f"{where} returned an infinite value; expected finite floats (or None)")
    return torch.tensor(floats, dtype=torch.float32)


def rm_score(raw: Tensor, reward_mean: float, reward_std: float) -> Tensor:
    """(B,) (RM − reward_mean)/reward_std: 0 is an average response on the reward entry's data."""
    return (raw.float() - reward_mean) / reward_std


def standardize(x: Tensor, group_size: int, world_size: int, eps: float = 1e-4) -> Tensor:
    """(B,) (x − mean)/(std + eps) over each group of `group_size` consecutive rows, or over the global batch (every
    process) when `group_size` is 1; NaN entries are left out of the statistics and stay NaN."""
    valid = ~torch.isnan(x)
    v = valid.float()
    x0 = torch.where(valid, x, torch.zeros_like(x))
    if group_size > 1:
        g, gv = x0.view(-1, group_size), v.view(-1, group_size)
        n = gv.sum(1, keepdim=True)
        mean = g.sum(1, keepdim=True) / n.clamp(min=1)
        var = (((g - mean) * gv) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        out = ((g - mean) / (var.sqrt() + eps)).flatten()
    else:
        from rlhf.ppo.distributed import global_mean_var

        if world_size == 1 and int(valid.sum()) < 2:  # no spread to measure: every valid value is its own mean
            return torch.where(valid, torch.zeros_like(x), x)
        mean, var = global_mean_var(x0, valid, world_size)
        out = (x0 - mean) / (var.clamp(min=0).sqrt() + eps)
    return torch.where(valid, out, x)


@dataclass
class SequenceRewards:
    """What each response earned, before the per-token KL penalty."""

    components: dict[str, Tensor]  # name -> (B,) raw value (rm: normalized score; toxicity: probability; NaN: None)
    total: Tensor  # (B,) Σ_i c_i·x_i − missing_eos_penalty·[no EOS]

    @property
    def score(self) -> Tensor:  # (B,) normalized RM score
        return self.components["rm"]

    @property
    def toxicity(self) -> Tensor:  # (B,) toxicity scorer's probability
        return self.components["toxicity"]


def sequence_rewards(components: dict[str, Tensor], coefficients: dict[str, float], has_eos: Tensor, *,
                     missing_eos_penalty: float, aggregation: str = "sum_then_normalize", group_size: int = 1,
                     world_size: int = 1) -> SequenceRewards:
    """The reward of each whole response (see the module docstring). `components` holds every component's (B,)
    values, `rm` and `toxicity` included; `coefficients` the c_i of those in the sum (a component without one
    is measured and logged only)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    device = components["rm"].device
    components = {k: v.to(device, torch.float32) for k, v in components.items()}
    total = torch.zeros_like(components["rm"])
    for name, c in coefficients.items():
        x = components[name]
        if aggregation == "normalize_then_sum":
            x = standardize(x, group_size, world_size)
        total = total + torch.nan_to_num(c * x, nan=0.0)
    total = total - missing_eos_penalty * (~has_eos.bool()).to(total.dtype)
    return SequenceRewards(components=components, total=total)


@dataclass
class Targets:
    """Per-token quantities of one rollout, all (B, R) and 0 on pads."""

    kl: Tensor  # KL estimate (kl_estimator) between policy and reference
    rewards: Tensor  # −β·kl (β = 0 when the KL is in the loss), plus the response's total at its last real token
    advantages: Tensor  # GAE (whitened over every process) or the critic-free estimator's, on every real token
    returns: Tensor | None  # value targets: advantages (before whitening) + values; None without a critic


def gae_targets(total: Tensor, logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, mask: Tensor, *,
                kl_coef: float, kl_estimator: str, gamma: float, lam: float, whiten_rewards: bool,
                world_size: int) -> Targets:
    """Per-token rewards, GAE advantages and returns (see `rlhf.ppo.losses.compute_gae`)."""
    from rlhf.ppo.distributed import global_whiten
    from rlhf.ppo.losses import compute_gae, kl_penalty, masked_whiten, per_token_rewards

    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)  # (B, R)
    rewards = per_token_rewards(total, kl, kl_coef, mask)  # (B, R)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    return Targets(kl=kl, rewards=rewards, advantages=global_whiten(advantages, mask, world_size), returns=returns)


def critic_free_targets(total: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, estimator: str,
                        group_size: int, kl_coef: float, kl_estimator: str, gamma: float,
                        world_size: int) -> Targets:
    """Advantages without a critic (`rlhf.ppo.estimators`). With the KL in the reward (`kl_coef` > 0), the
    per-response estimators (grpo, dr_grpo, rloo) compare s = total − β·Σ_t kl_t within each group, and the
    per-token ones (reinforce_pp, reinforce_baseline) take returns of the per-token rewards; `kl_coef` 0 when the
    KL is a loss term."""
    from rlhf.ppo import estimators as est
    from rlhf.ppo.losses import kl_penalty, per_token_rewards

    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)  # (B, R)
    m = mask.to(kl.dtype)
    if estimator in ("grpo", "dr_grpo", "rloo"):
        s = total - kl_coef * (kl * m).sum(1)  # (B,)
        per_response = {"grpo": est.grpo_advantages, "dr_grpo": est.dr_grpo_advantages,
                        "rloo": est.rloo_advantages}[estimator](s, group_size)
        return Targets(kl=kl, rewards=per_token_rewards(total, kl, kl_coef, mask),
                       advantages=per_response[:, None] * m, returns=None)
    if estimator == "reinforce_pp":
        rewards = per_token_rewards(total, kl, kl_coef, mask)
        return Targets(kl=kl, rewards=rewards, advantages=est.reinforce_pp_advantages(rewards, mask, gamma, world_size),
                       returns=None)
    if estimator == "reinforce_baseline":
        rewards = per_token_rewards(est.group_mean_baseline(total, group_size), kl, kl_coef, mask)
        return Targets(kl=kl, rewards=rewards, returns=None,
                       advantages=est.reinforce_pp_advantages(rewards, mask, gamma, world_size, shift_mean=False))
    raise ValueError(f"not a critic-free estimator: {estimator!r}")
