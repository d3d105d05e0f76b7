"""The two halves of a PPO step, and what lets a run survive a crash.

    rollout(...)      sample responses with the policy and compute, without gradients,
                      what the update needs: logprobs, reference logprobs, values, RM scores
    ppo_update(...)   `num_ppo_epochs` x `num_mini_batches` clipped policy/value steps
    save_checkpoint / load_checkpoint   numbered, atomic checkpoints for --resume

Data parallelism is done by hand (`all_reduce_mean` on gradients, `global_whiten` on
advantages): each micro-batch runs two backward passes through different adapters of
one base, which a DDP wrapper does not fit. `stages/03_ppo.py` owns the config and the loop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf.errors import UserError


def rollout(ac, tokenizer, prompt_ids, cfg, dev):
    """Sample responses and compute everything the update needs, without gradients.

    Returns a dict of tensors: query_responses (B, P+R), attention_mask (B, P+R), responses (B, R),
    mask (B, R), logprobs, ref_logprobs, values (B, R), rm_scores (B,), has_eos (B,), and P.

    The policy's logprobs come from the logits `generate` computed while sampling (raw logits,
    divided by the temperature as the update does); no second policy forward. The reference,
    value and reward each take one forward per `local_rollout_forward_batch_size` rows.
    """
    import torch

    from rlhf.generation import left_pad
    from rlhf.ppo_math import logprobs_from_logits

    ids, pmask = left_pad(prompt_ids, tokenizer.pad_token_id)  # (B, P)
    ids, pmask = ids.to(dev), pmask.to(dev)
    P = ids.shape[1]
    with torch.no_grad():
        out = ac.generate(input_ids=ids, attention_mask=pmask, do_sample=True, temperature=cfg.temperature,
                          top_k=0, top_p=1.0, max_new_tokens=cfg.response_length, min_new_tokens=1,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          output_logits=True, return_dict_in_generate=True)
    responses = out.sequences[:, P:]  # (B, R'), R' <= response_length
    is_eos = responses == tokenizer.eos_token_id
    # Real tokens: everything up to and including the first EOS.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).long()  # (B, R')
    responses = responses.masked_fill(after_eos, tokenizer.pad_token_id)
    query_responses = torch.cat([ids, responses], dim=1)  # (B, P+R')
    attention_mask = torch.cat([pmask, mask], dim=1)  # (B, P+R')
    R = responses.shape[1]

    # `out.logits[t]` (B, V): the raw logits that response token t was sampled from (before the
    # temperature and min_new_tokens processors), one step at a time; consumed step by step so
    # at most one (B, V) float copy lives beside them.
    logprobs = torch.cat([logprobs_from_logits(step.float()[:, None] / cfg.temperature, responses[:, t:t + 1])
                          for t, step in enumerate(out.logits)], dim=1)  # (B, R')
    del out

    # Reference, value and reward forwards in chunks of `local_rollout_forward_batch_size` rows, each cut
    # to its own window of real tokens (trim_columns); with `group_by_length` the chunks take rows in
    # order of length, so short rows are not padded to the longest. Positions past a row's last real
    # token stay 0 (masked everywhere downstream).
    B = len(query_responses)
    ref_logprobs = torch.zeros(B, R, device=dev)
    values = torch.zeros(B, R, device=dev)
    rm_scores = torch.zeros(B, device=dev) if ac.separate_reward is None else None
    fb = cfg.local_rollout_forward_batch_size
    with torch.no_grad():
        for rows in length_chunks(attention_mask, fb, cfg.group_by_length):
            lead, p, r = trim_columns(attention_mask[rows], P)
            qr, am = query_responses[rows, lead:P + r], attention_mask[rows, lead:P + r]
            ref, v, scores = ac.rollout_forward(qr, am, r)  # ref (b, r, V): position p-1+t predicts token t
            ref_logprobs[rows, :r] = logprobs_from_logits(ref / cfg.temperature, responses[rows, :r])
            del ref
            values[rows, :r] = v[:, p - 1:-1]
            if rm_scores is not None:
                rm_scores[rows] = scores
    batch = {
        "query_responses": query_responses, "attention_mask": attention_mask, "responses": responses,
        "mask": mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
        "values": values, "has_eos": is_eos.any(dim=1),
    }
    if rm_scores is not None:
        batch["rm_scores"] = rm_scores
    batch["P"] = P
    return batch


def length_chunks(attention_mask, size: int, by_length: bool) -> list:
    """Row indices in chunks of at most `size`: in row order, or (`by_length`) shortest rows first.

    Rows are independent in every forward (own mask and position ids) and the update weights each
    micro-batch by its tokens, so grouping rows by length changes no result beyond float rounding;
    with `trim_columns`, a chunk of short rows then runs on short columns. The sort is stable: the
    same rows always give the same chunks.
    """
    import torch

    n = attention_mask.shape[0]
    order = (torch.argsort(attention_mask.sum(1), stable=True) if by_length
             else torch.arange(n, device=attention_mask.device))
    return [order[i:i + size] for i in range(0, n, size)]


def all_reduce_mean(tensors, world_size: int) -> None:
    """Average gradients (or stats) over processes: data parallelism without a DDP wrapper,
    since each micro-batch runs two backward passes through different adapters."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size)


def global_whiten(x, mask, world_size: int):
    """Whiten `x` over the real tokens of every process (one process: `masked_whiten`)."""
    import torch

    from rlhf.ppo_math import masked_whiten

    if world_size == 1:
        return masked_whiten(x, mask)
    m = mask.to(x.dtype)
    sums = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    all_reduce_mean([sums], world_size)
    mean, var = sums[0] / sums[2], sums[1] / sums[2] - (sums[0] / sums[2]) ** 2
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), x)


def trim_columns(attention_mask, P: int) -> tuple[int, int, int]:
    """(lead, prompt width, response width) of the smallest column window holding every real token.

    Rows are left-padded to the whole batch's longest prompt and right-padded after their EOS, so a
    micro-batch often has columns that are padding in every row; with position ids from the mask,
    dropping them leaves every real token's logits and values unchanged (and costs nothing to compute).
    Columns `lead:P + r` are kept; every row has at least one prompt and one response token.
    """
    real = attention_mask.bool().any(dim=0).nonzero().squeeze(1)  # real columns; contiguous around P
    lead, end = int(real[0]), int(real[-1]) + 1
    return lead, P - lead, end - P


def ppo_update(ac, optimizer, scheduler, params, batch, advantages, returns, cfg, sizes, step_seed):
    """`num_ppo_epochs` × `num_mini_batches` optimizer steps over one rollout batch; returns mean stats.

    Each minibatch's loss is the mean over all its real tokens, on every process together:
    a micro-batch's masked mean is weighted by its share of the minibatch's tokens, so
    the gradient is the same for any split into micro-batches or processes
    (per_device_train_batch_size × gradient_accumulation_steps × world_size).
    """
    import torch

    from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits, masked_mean, policy_loss, value_loss

    P = batch["P"]
    g = torch.Generator().manual_seed(step_seed)
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "vf_loss", "approxkl", "clipfrac", "vf_clipfrac", "entropy")}
    mbs = cfg.per_device_train_batch_size
    for _ in range(cfg.num_ppo_epochs):
        order = torch.randperm(sizes.local_batch_size, generator=g)
        for start in range(0, sizes.local_batch_size, sizes.local_mini_batch_size):
            mini = order[start:start + sizes.local_mini_batch_size]
            n_tokens = batch["mask"][mini].sum().float().reshape(1)
            all_reduce_mean([n_tokens], sizes.world_size)  # mean tokens per process in this minibatch
            optimizer.zero_grad(set_to_none=True)
            # Micro-batches of the minibatch's rows (shortest first with group_by_length): same gradient.
            for chunk in length_chunks(batch["attention_mask"][mini], mbs, cfg.group_by_length):
                idx = mini[chunk]
                # Only the columns where some row of this micro-batch has a real token (see trim_columns).
                lead, p_mb, r = trim_columns(batch["attention_mask"][idx], P)
                qr = batch["query_responses"][idx, lead:P + r]
                am = batch["attention_mask"][idx, lead:P + r]
                resp, mb_mask = batch["responses"][idx, :r], batch["mask"][idx, :r]
                old_logprobs, old_values = batch["logprobs"][idx, :r], batch["values"][idx, :r]
                mb_adv, mb_ret = advantages[idx, :r], returns[idx, :r]
                weight = mb_mask.sum().float() / n_tokens.item()  # this micro-batch's share of the tokens
                # Policy logits and values from one forward (ActorCritic.fused) or one per role; the
                # policy and value adapters are disjoint, so one backward of the summed loss gives each its own.
                logits, new_values = ac.update_forward(qr, am, r)
                # Policy: clipped surrogate on fresh logprobs (temperature applied as at sampling time).
                logits = logits / cfg.temperature  # (b, r, V)
                new_logprobs = logprobs_from_logits(logits, resp)
                pg_loss, pg_stats = policy_loss(new_logprobs, old_logprobs, mb_adv, mb_mask, cfg.cliprange)
                if not torch.isfinite(pg_loss):
                    raise UserError("non-finite policy loss (NaN/inf logits or ratios); stopping before the update, "
                                    "the last good checkpoint is kept; try a lower learning_rate or temperature")
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits.detach()), mb_mask)
                # Value: clipped regression to the GAE returns (value adapter and head).
                new_values = new_values[:, p_mb - 1:-1]
                vf_loss, vf_stats = value_loss(new_values, old_values, mb_ret, mb_mask, cfg.cliprange_value)
                if not torch.isfinite(vf_loss):
                    raise UserError("non-finite value loss; stopping before the update, the last good checkpoint is kept")
                ((pg_loss + cfg.vf_coef * vf_loss) * weight).backward()
                del logits
                for k, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("entropy", entropy),
                             *pg_stats.items(), *vf_stats.items()):
                    stats[k].append(float(v.detach()))
            all_reduce_mean([p.grad for p in params if p.grad is not None], sizes.world_size)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
    scheduler.step()
    return {k: sum(v) / len(v) for k, v in stats.items()}


def save_checkpoint(work_dir, ac, optimizer, scheduler, controllers, step, keep: int = 2) -> Path:
    """Everything --resume needs in `checkpoint-<step>/`: trainable tensors, optimizer, scheduler,
    KL/Lagrange state, RNG, step. Written to a temporary folder and renamed into place, with
    `trainer_state.json` last (a folder without it is never resumed from); older ones are then
    removed, keeping `keep`."""
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder = work_dir / f"checkpoint-{step}"
    tmp = work_dir / f"tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(ac.trainable_state_dict(), str(tmp / "trainable.safetensors"))
    np_state = np.random.get_state()
    torch.save({
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python_rng": random.getstate(),
    }, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({
        "step": step, "controllers": {k: c.state_dict() for k, c in controllers.items()}}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    older = sorted((p for p in work_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))[:-keep]
    for p in older:
        shutil.rmtree(p, ignore_errors=True)
    return folder


def load_checkpoint(folder, ac, optimizer, scheduler, controllers) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    ac.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    meta = json.loads((folder / "trainer_state.json").read_text())
    for k, c in controllers.items():
        c.load_state_dict(meta["controllers"][k])
    return meta
