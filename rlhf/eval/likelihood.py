"""Log-likelihoods of given tokens under a causal LM: sampled responses and held-out assistant turns.

Used by the comparison (stage 04) for KL to the base model and held-out perplexity.
"""

from __future__ import annotations


def response_logprob_sums(model, pad_id: int, rows: list[list[int]], responses: list[list[int]],
                          temperature: float, batch_size: int):
    """(N,) Σ_t log p(response token t | prompt, earlier tokens) with logits / temperature (numpy).

    Rows are batched in order of length (prompt, then response), so a batch pads little; the sums come back in
    the rows' order."""
    import numpy as np
    import torch

    from rlhf.ppo.losses import logprobs_from_logits
    from rlhf.sequences import left_pad, position_ids, right_pad

    dev = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), len(responses[i])))
    rows, responses = [rows[i] for i in order], [responses[i] for i in order]
    sums = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            p_ids, p_mask = left_pad(rows[start:start + batch_size], pad_id)  # (b, P)
            r_ids, r_mask = right_pad(responses[start:start + batch_size], pad_id)  # (b, R)
            ids, mask = torch.cat([p_ids, r_ids], 1).to(dev), torch.cat([p_mask, r_mask], 1).to(dev)
            R = r_ids.shape[1]
            # The last R + 1 positions: position P−1+t predicts response token t.
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                           logits_to_keep=R + 1, use_cache=False).logits[:, :-1]  # (b, R, V)
            logprobs = logprobs_from_logits(logits.float() / temperature, r_ids.to(dev))  # (b, R)
            sums.append((logprobs * r_mask.to(dev)).sum(-1).cpu())
    out = np.zeros(len(rows))
    if sums:
        out[order] = torch.cat(sums).double().numpy()
    return out


def assistant_nll(model, tokenizer, dialogues: list[dict], max_length: int, batch_size: int) -> tuple[float, int]:
    """(Σ −log p, number of tokens) over the assistant tokens of the dialogues (first max_length tokens each)."""
    import torch

    from rlhf.chat_format import assistant_mask
    from rlhf.ppo.losses import logprobs_from_logits
    from rlhf.sequences import right_pad

    dev = next(model.parameters()).device
    encoded = [assistant_mask(tokenizer, d["messages"]) for d in dialogues]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            ids, attn = right_pad([e[0][:max_length] for e in chunk], tokenizer.pad_token_id)  # (b, T)
            target_mask, _ = right_pad([e[1][:max_length] for e in chunk], 0)  # (b, T)
            ids, attn = ids.to(dev), attn.to(dev)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]  # (b, T−1, V)
            logprobs = logprobs_from_logits(logits.float(), ids[:, 1:])  # (b, T−1)
            m = (target_mask[:, 1:].to(dev) * attn[:, 1:]).float()
            nll -= float((logprobs * m).sum())
            count += int(m.sum())
    return nll, count
