"""Batched generation from chat prompts, shared by evaluation, comparison and chat.

Prompts are rendered with the tokenizer's chat template and a generation prompt
(`rlhf.chat_format.encode`), left-padded (so every row's last prompt token sits at the
same position and the KV cache stays aligned), and decoded up to the first stop token:
the EOS that ends an assistant turn (`rlhf.models.load_tokenizer`) or another stop token
of the model's generation config (`rlhf.models.stop_token_ids`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def encode_prompts(tokenizer: Any, prompts: list[list[dict]], max_prompt_length: int | None = None) -> "torch.Tensor":
    """Token ids of each rendered prompt, keeping the last `max_prompt_length` tokens (the newest turns)."""
    from rlhf.chat_format import encode

    out = []
    for messages in prompts:
        ids = encode(tokenizer, messages, add_generation_prompt=True)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out


def generate_ids(model: Any, tokenizer: Any, rows: list[list[int]], *, max_new_tokens: int, do_sample: bool,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32) -> tuple[list[list[int]], list[bool]]:
    """Response ids for prompt token rows (cut after the first stop token, which is kept: the EOS or another of
    `rlhf.models.stop_token_ids`) and whether each has one."""
    import torch

    from rlhf.models import stop_token_ids
    from rlhf.sequences import left_pad

    dev = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    responses, ended = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[start:start + batch_size], tokenizer.pad_token_id)  # (b, P)
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, **kwargs)
            for row in out[:, ids.shape[1]:].tolist():
                end = next((t for t, token in enumerate(row) if token in stops), None)
                responses.append(row if end is None else row[: end + 1])
                ended.append(end is not None)
    return responses, ended


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 48,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    max_prompt_length: int | None = None,
    seed: int | None = None,
) -> tuple[list[str], list[bool]]:
    """Replies (decoded, special tokens dropped) and whether each ended with a stop token."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    responses, ended = generate_ids(model, tokenizer, encode_prompts(tokenizer, prompts, max_prompt_length),
                                    max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                    top_p=top_p, batch_size=batch_size)
    model.train(was_training)
    texts = [tokenizer.decode(r[:-1] if e else r, skip_special_tokens=True).strip() for r, e in zip(responses, ended)]
    return texts, ended
