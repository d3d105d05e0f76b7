"""The second half of a step: `num_ppo_epochs` × `num_mini_batches` clipped policy (and value) steps.

    UpdateSettings   the sizes and coefficients of the update (built from the stage config)
    ppo_update(...)  one rollout batch's optimizer steps; returns the mean statistics

Each minibatch's policy loss is aggregated over the whole minibatch on every process together
(`loss_type`, `rlhf.ppo.losses.aggregate_loss`), the value loss is the mean over all its real tokens:
a micro-batch contributes its share, so the gradient is the same for any split into micro-batches or
processes (micro_batch_size × accumulation × world size; tests/test_ppo_stage.py holds both
invariants). With `kl_in_loss` the per-token KL to the reference, times β, is added to the policy's
per-token loss (GRPO's way); a rollout without values (a critic-free estimator) has no value loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf.errors import UserError
from rlhf.ppo.rollout import Rollout


@dataclass(frozen=True)
class UpdateSettings:
    """What `ppo_update` needs besides tensors; names as in the stage config (TRL's PPOConfig)."""

    num_ppo_epochs: int
    local_batch_size: int  # rows of this process's rollout
    local_mini_batch_size: int  # rows per optimizer step on this process
    micro_batch_size: int  # rows per forward/backward (per_device_train_batch_size)
    world_size: int
    temperature: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    max_grad_norm: float
    group_by_length: bool = True
    loss_type: str = "dapo"  # rlhf.ppo.losses.LOSS_TYPES
    kl_estimator: str = "k1"  # of the KL term in the loss (kl_in_loss)
    response_length: int = 0  # dr_grpo's normalizer


def ppo_update(ac: Any, optimizer: torch.optim.Optimizer, scheduler: Any, params: list[Tensor], batch: Rollout,
               advantages: Tensor, returns: Tensor | None, settings: UpdateSettings, step_seed: int,
               kl_coef_in_loss: float = 0.0) -> dict[str, float]:
    """Optimizer steps over one rollout batch (see the module docstring); `advantages` and `returns` (B, R),
    `returns` None without a critic (`batch.values` None).

    `ac` is an `rlhf.ppo.actor_critic.ActorCritic`; `params` its trainable tensors (gradients clipped and
    averaged over processes); `step_seed` seeds the minibatch order; `kl_coef_in_loss`: β of the KL term in
    the loss (0: none, the KL is in the reward). Returns the mean of each statistic.
    """
    from rlhf.ppo.distributed import all_reduce_mean
    from rlhf.ppo.losses import (aggregate_loss, clipped_surrogate, entropy_from_logits, kl_penalty,
                                 logprobs_from_logits, masked_mean, value_loss)
    from rlhf.sequences import length_chunks, trim_columns

    s = settings
    P = batch.prompt_width
    g = torch.Generator().manual_seed(step_seed)
    critic = batch.values is not None
    names = ["pg_loss", "approxkl", "clipfrac", "entropy"] + (["vf_loss", "vf_clipfrac"] if critic else [])
    stats: dict[str, list[float]] = {k: [] for k in names + (["kl_loss"] if kl_coef_in_loss else [])}
    for _ in range(s.num_ppo_epochs):
        order = torch.randperm(s.local_batch_size, generator=g)
        for start in range(0, s.local_batch_size, s.local_mini_batch_size):
            mini = order[start:start + s.local_mini_batch_size]
            n_tokens = batch.mask[mini].sum().float().reshape(1)
            all_reduce_mean([n_tokens], s.world_size)  # mean tokens per process in this minibatch
            optimizer.zero_grad(set_to_none=True)
            # Micro-batches of the minibatch's rows (shortest first with group_by_length): same gradient.
            for chunk in length_chunks(batch.attention_mask[mini], s.micro_batch_size, s.group_by_length):
                idx = mini[chunk]
                # Only the columns where some row of this micro-batch has a real token (see trim_columns).
                lead, p_mb, r = trim_columns(batch.attention_mask[idx], P)
                qr = batch.query_responses[idx, lead:P + r]
                am = batch.attention_mask[idx, lead:P + r]
                resp, mb_mask = batch.responses[idx, :r], batch.mask[idx, :r]
                weight = mb_mask.sum().float() / n_tokens.item()  # this micro-batch's share of the tokens
                # Policy logits and values from one forward (ActorCritic.fused) or one per role; the
                # policy and value adapters are disjoint, so one backward of the summed loss gives each its own.
                logits, new_values = ac.update_forward(qr, am, r)
                # Policy: clipped surrogate on fresh logprobs (temperature applied as at sampling time).
                logits = logits / s.temperature  # (b, r, V)
                new_logprobs = logprobs_from_logits(logits, resp)
                per_token, pg_stats = clipped_surrogate(new_logprobs, batch.logprobs[idx, :r], advantages[idx, :r],
                                                        mb_mask, s.cliprange)
                step_stats = {"pg_loss": masked_mean(per_token, mb_mask), **pg_stats}
                if kl_coef_in_loss:
                    kl = kl_penalty(new_logprobs, batch.ref_logprobs[idx, :r], s.kl_estimator)  # (b, r)
                    per_token = per_token + kl_coef_in_loss * kl
                    step_stats["kl_loss"] = masked_mean(kl, mb_mask)
                loss = aggregate_loss(per_token, mb_mask, s.loss_type, minibatch_tokens=n_tokens.item(),
                                      minibatch_rows=s.local_mini_batch_size, response_length=s.response_length)
                if not torch.isfinite(loss):
                    raise UserError("non-finite policy loss (NaN/inf logits or ratios); stopping before the update, "
                                    "the last good checkpoint is kept; try a lower learning_rate or temperature")
                with torch.no_grad():
                    step_stats["entropy"] = masked_mean(entropy_from_logits(logits.detach()), mb_mask)
                if critic:  # Value: clipped regression to the GAE returns (value adapter and head).
                    new_values = new_values[:, p_mb - 1:-1]
                    vf_loss, vf_stats = value_loss(new_values, batch.values[idx, :r], returns[idx, :r], mb_mask,
                                                   s.cliprange_value)
                    if not torch.isfinite(vf_loss):
                        raise UserError("non-finite value loss; stopping before the update, the last good checkpoint "
                                        "is kept")
                    loss = loss + s.vf_coef * vf_loss * weight
                    step_stats.update(vf_loss=vf_loss, **vf_stats)
                loss.backward()
                del logits
                for k, v in step_stats.items():
                    stats[k].append(float(v.detach()))
            all_reduce_mean([p.grad for p in params if p.grad is not None], s.world_size)
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
    scheduler.step()
    return {k: sum(v) / len(v) for k, v in stats.items()}
