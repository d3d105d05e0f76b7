"""The first half of a PPO step: sample responses and record, without gradients, what the update needs.

    prompt_indices(...)   which prompts a process samples at a step (a fixed permutation per pass)
    rollout(...)          -> Rollout: responses, their logprobs, reference logprobs, values, RM scores

The policy's logprobs come from the logits `generate` computed while sampling (raw logits divided by
the temperature, as the update does); no second policy forward. The reference, value and reward take
one forward (or one fused forward, `ActorCritic.rollout_forward`) per `forward_batch_size` rows; without
a critic there is no value forward. A prompt given k times in a row (num_generations) is sampled k times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One process's batch of sampled responses. Rows are a left-padded prompt then a right-padded response:
    P = `prompt_width` columns, R = the longest response (<= response_length); see `rlhf.sequences`."""

    query_responses: Tensor  # (B, P+R) prompt + response ids
    attention_mask: Tensor  # (B, P+R) 1 on real tokens
    responses: Tensor  # (B, R) response ids, pad after the first EOS
    mask: Tensor  # (B, R) 1 on real response tokens, EOS included
    logprobs: Tensor  # (B, R) log π_θ_old(a_t|s_t) at sampling time (temperature applied)
    ref_logprobs: Tensor  # (B, R) log π_ref(a_t|s_t)
    values: Tensor | None  # (B, R) V(s_t) of the critic at sampling time; None without a critic
    has_eos: Tensor  # (B,) the response ended with EOS (else it was cut at response_length)
    prompt_width: int  # P
    rm_scores: Tensor | None  # (B,) raw RM scores; None without a reward adapter (a separate RM scores the text)

    def __len__(self) -> int:
        return self.responses.shape[0]


def prompt_indices(step: int, rank: int, *, batch_size: int, local_batch_size: int, n_prompts: int,
                   seed: int) -> list[int]:
    """The prompts process `rank` samples at `step` (0-based): the global sample stream runs through one
    permutation of the prompts per pass over them, drawn from (seed, pass) alone, so a resumed run needs only
    `step` to continue the same stream; each step takes the next `batch_size`, `local_batch_size` per process."""
    first = step * batch_size + rank * local_batch_size
    idx = []
    for j in range(first, first + local_batch_size):
        epoch, k = divmod(j, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        idx.append(int(perm[k]))
    return idx


def rollout(ac: Any, prompt_ids: list[list[int]], *, pad_token_id: int, eos_token_id: int | list[int], temperature: float,
            response_length: int, forward_batch_size: int, group_by_length: bool, device: torch.device) -> Rollout:
    """Sample one response per prompt with the policy (`ac`: rlhf.ppo.actor_critic.ActorCritic) and compute,
    without gradients, everything the update needs (see `Rollout`)."""
    from rlhf.ppo.losses import logprobs_from_logits
    from rlhf.sequences import left_pad, length_chunks, trim_columns

    ids, pmask = left_pad(prompt_ids, pad_token_id)  # (B, P)
    ids, pmask = ids.to(device), pmask.to(device)
    P = ids.shape[1]
    with torch.no_grad():
        out = ac.generate(input_ids=ids, attention_mask=pmask, do_sample=True, temperature=temperature,
                          top_k=0, top_p=1.0, max_new_tokens=response_length, min_new_tokens=1,
                          pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                          output_logits=True, return_dict_in_generate=True)
    responses = out.sequences[:, P:]  # (B, R), R <= response_length
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    is_eos = torch.isin(responses, stops)  # any stop token ends a response (rlhf.models.stop_token_ids)
    # Real tokens: everything up to and including the first EOS.
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~after_eos).long()  # (B, R)
    responses = responses.masked_fill(after_eos, pad_token_id)
    query_responses = torch.cat([ids, responses], dim=1)  # (B, P+R)
    attention_mask = torch.cat([pmask, mask], dim=1)  # (B, P+R)
    R = responses.shape[1]

    # `out.logits[t]` (B, V): the raw logits that response token t was sampled from (before the
    # temperature and min_new_tokens processors), one step at a time; consumed step by step so
    # at most one (B, V) float copy lives beside them.
    logprobs = torch.cat([logprobs_from_logits(step.float()[:, None] / temperature, responses[:, t:t + 1])
                          for t, step in enumerate(out.logits)], dim=1)  # (B, R)
    del out

    # Reference, value and reward forwards in chunks of `forward_batch_size` rows, each cut to its own window
    # of real tokens (trim_columns); with `group_by_length` the chunks take rows in order of length, so short
    # rows are not padded to the longest. Positions past a row's last real token stay 0 (masked downstream).
    B = len(query_responses)
    ref_logprobs = torch.zeros(B, R, device=device)
    values = torch.zeros(B, R, device=device) if ac.critic else None
    rm_scores = torch.zeros(B, device=device) if ac.reward_head is not None else None
    with torch.no_grad():
        for rows in length_chunks(attention_mask, forward_batch_size, group_by_length):
            lead, p, r = trim_columns(attention_mask[rows], P)
            qr, am = query_responses[rows, lead:P + r], attention_mask[rows, lead:P + r]
            ref, v, scores = ac.rollout_forward(qr, am, r)  # ref (b, r, V): position p-1+t predicts token t
            ref_logprobs[rows, :r] = logprobs_from_logits(ref / temperature, responses[rows, :r])
            del ref
            if values is not None:
                values[rows, :r] = v[:, p - 1:-1]
            if rm_scores is not None:
                rm_scores[rows] = scores
    return Rollout(query_responses=query_responses, attention_mask=attention_mask, responses=responses, mask=mask,
                   logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, has_eos=is_eos.any(dim=1),
                   prompt_width=P, rm_scores=rm_scores)
