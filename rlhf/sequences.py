"""Padding and indexing of token rows: what every forward over a batch of conversations relies on.

Prompts are LEFT-padded (every row's last prompt token sits at the same column, so generation's KV
cache stays aligned); responses and whole conversations are RIGHT-padded (real tokens first). A
PPO row is both: a left-padded prompt followed by a right-padded response,

    columns   0 .. P-1          P .. P+R-1
    row       pad pad p p p     r r r EOS pad
    mask      0   0   1 1 1     1 1 1 1   0

Position ids count real tokens only (`position_ids`), as `generate` does for left padding, so a
row's logits do not depend on how much padding its batch added. Everything here takes and returns
tensors (or lists of token ids) and knows nothing about models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor


def left_pad(rows: list[list[int]], pad_id: int) -> tuple["Tensor", "Tensor"]:
    """(input_ids, attention_mask), both (B, T) with T the longest row, padded on the left."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple["Tensor", "Tensor"]:
    """(input_ids, attention_mask), both (B, T) with T = `width` or the longest row, padded on the right."""
    import torch

    width = max(max(len(r) for r in rows), width or 0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def position_ids(attention_mask: "Tensor") -> "Tensor":
    """(B, T) positions counting real tokens only, as `generate` does for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: "Tensor") -> "Tensor":
    """(B,) column of each row's rightmost real token (right padding, or a left-padded prompt + response)."""
    import torch

    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(dim=1)


def trim_columns(attention_mask: "Tensor", P: int) -> tuple[int, int, int]:
    """(lead, prompt width, response width) of the smallest column window holding every real token.

    Rows are left-padded to the whole batch's longest prompt and right-padded after their EOS, so a
    micro-batch often has columns that are padding in every row; with position ids from the mask,
    dropping them leaves every real token's logits and values unchanged (and costs nothing to compute).
    Columns `lead:P + r` are kept; every row has at least one prompt and one response token.
    """
    real = attention_mask.bool().any(dim=0).nonzero().squeeze(1)  # real columns; contiguous around P
    lead, end = int(real[0]), int(real[-1]) + 1
    return lead, P - lead, end - P


def length_chunks(attention_mask: "Tensor", size: int, by_length: bool) -> list["Tensor"]:
    """Row indices in chunks of at most `size`: in row order, or (`by_length`) shortest rows first.

    Rows are independent in every forward (own mask and position ids) and PPO's update weights each
    micro-batch by its tokens, so grouping rows by length changes no result beyond float rounding;
    with `trim_columns`, a chunk of short rows then runs on short columns. The sort is stable: the
    same rows always give the same chunks.
    """
    import torch

    n = attention_mask.shape[0]
    order = (torch.argsort(attention_mask.sum(1), stable=True) if by_length
             else torch.arange(n, device=attention_mask.device))
    return [order[i:i + size] for i in range(0, n, size)]
