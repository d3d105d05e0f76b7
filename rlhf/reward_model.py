"""Reward-model scoring and the reward artifacts, shared by stages 02 (metrics), 03 (PPO reward) and 04.

A reward model maps a conversation (prompt + response, rendered through the chat
template and cut after the response's EOS: `conversation_ids`) to one scalar: a
linear score head applied to the final hidden state at the last real token, which
is the EOS that ends the response, as in PPO's rollouts.

What a `reward` registry entry holds (its config says which, `reward_kind`):

    reward_kind "model"     a sequence-classification model (num_labels=1) + tokenizer;
                            load it with `rlhf.models.load_model(path, kind="score")`.
    reward_kind "adapter"   adapter/                 peft LoRA adapter for the CAUSAL LM `base_model`
                                                     (module names as in AutoModelForCausalLM)
                            score_head.safetensors   `weight` (1, H) [and `bias` (1,)], float32
                            tokenizer files
                            Load `base_model` as a causal LM (4-bit when `load_in_4bit`), attach
                            the adapter, and apply the head to the final hidden state with
                            `last_token_scores` (hidden_states[-1] of an eval-mode forward with
                            output_hidden_states=True, which is after the final norm).

Sequences are RIGHT-padded here and the score is read at the rightmost real
token, so extra padding never changes a score (tests/test_reward_stage.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_DIR = "adapter"
SCORE_HEAD_FILE = "score_head.safetensors"
HEAD_MODULE = "score"  # the score head's attribute name on transformers' *ForSequenceClassification models


def conversation_ids(tokenizer: Any, messages: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a full conversation through the chat template, ending at its last EOS.

    Chat templates close a turn with EOS and then a separator (the demo's `<|end|>\\n`, Qwen's
    `<|im_end|>\\n`, which `rlhf.models.load_tokenizer` makes the EOS); PPO's generations stop at EOS, so the
    reward model is trained and read at the EOS itself and whatever the template puts after it is dropped.
    Longer than `max_length`: the LAST `max_length` tokens are kept (the score is read at the end).
    """
    from rlhf.chat_format import encode

    ids = encode(tokenizer, messages)
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: len(ids) - ids[::-1].index(eos)]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def score_ids(model: Any, rows: list[list[int]], pad_id: int, *, head: dict[str, "torch.Tensor"] | None = None,
              batch_size: int = 32, extra_padding: int = 0) -> "torch.Tensor":
    """Scores (N,) float32 of token-id rows, right-padded and batched by length (less padding).

    head None: `model` is a sequence-classification model (num_labels=1); it pools at
    the rightmost token != `config.pad_token_id`, which must be the tokenizer's pad id.
    head given: `model` is a causal LM (with the reward adapter active) and the head is
    applied to its final hidden state at the last real token (`last_token_scores`):
    what PPO computes from a reward entry of kind "adapter".
    `extra_padding` adds pad columns to every batch: for the padding-invariance test.
    """
    import torch

    from rlhf.sequences import right_pad

    if head is None and getattr(model.config, "pad_token_id", None) != pad_id:
        raise ValueError(f"model.config.pad_token_id is {model.config.pad_token_id}, "
                         f"expected the tokenizer's pad id {pad_id}")
    dev = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = torch.empty(len(rows), dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = [rows[i] for i in idx]
            ids, mask = right_pad(batch, pad_id, max(len(r) for r in batch) + extra_padding)  # (B, T)
            ids, mask = ids.to(dev), mask.to(dev)
            if head is None:
                batch_scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1)  # (B,)
            else:
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
                batch_scores = last_token_scores(out.hidden_states[-1], mask, head["weight"], head.get("bias"))
            scores[idx] = batch_scores.float().cpu()
    model.train(was_training)
    return scores


def score_conversations(model: Any, tokenizer: Any, conversations: list[list[dict]], *, batch_size: int = 32,
                        max_length: int | None = None) -> "torch.Tensor":
    """Scores (N,) of full conversations (prompt messages + response messages) under a seq-cls reward model."""
    rows = [conversation_ids(tokenizer, c, max_length) for c in conversations]
    return score_ids(model, rows, tokenizer.pad_token_id, batch_size=batch_size)


def pairwise_metrics(chosen: "torch.Tensor", rejected: "torch.Tensor") -> dict[str, float]:
    """Held-out pair metrics from scores (N,) of the chosen and rejected responses.

    accuracy: share of pairs with chosen > rejected (a tie counts as wrong);
    margin: mean(chosen - rejected); loss: the Bradley-Terry loss mean(-log σ(chosen - rejected)).
    """
    import torch.nn.functional as F

    diff = chosen.float() - rejected.float()  # (N,)
    return {
        "accuracy": (diff > 0).float().mean().item(),
        "margin": diff.mean().item(),
        "loss": (-F.logsigmoid(diff)).mean().item(),
    }


def last_token_scores(hidden_states: "torch.Tensor", attention_mask: "torch.Tensor", weight: "torch.Tensor",
                      bias: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Apply a score head at each row's rightmost real token: (B, T, H), (B, T), (1, H), (1,) -> (B,).

    Works for right padding and for left-padded prompt + response alike (rightmost mask 1).
    """
    import torch

    from rlhf.sequences import last_token_index

    last = last_token_index(attention_mask)  # (B,)
    h = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]  # (B, H)
    out = h.float() @ weight.float().to(h.device).T  # (B, 1)
    if bias is not None:
        out = out + bias.float().to(h.device)
    return out.squeeze(-1)


def extract_score_head(model: Any, name: str = HEAD_MODULE) -> dict[str, "torch.Tensor"]:
    """The trained head's tensors (`weight` (1, H), `bias` (1,) if any) as float32 CPU copies.

    Works on a plain seq-cls model and on a peft model, where the trained copy is the
    `modules_to_save` one (the wrapped original stays at its initial values).
    """
    module = None
    for full_name, candidate in model.named_modules():
        if full_name == name or full_name.endswith(f".{name}"):
            module = candidate
            break
    if module is None:
        raise ValueError(f"the model has no '{name}' module (expected a *ForSequenceClassification model)")
    trained = getattr(module, "modules_to_save", None)  # peft's ModulesToSaveWrapper: {adapter name: copy}
    if trained is not None:
        module = trained["default"] if "default" in trained else next(iter(trained.values()))
    tensors = {"weight": module.weight.detach().float().cpu().contiguous()}
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = module.bias.detach().float().cpu().contiguous()
    return tensors


def save_score_head(tensors: dict[str, "torch.Tensor"], folder: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / SCORE_HEAD_FILE
    save_file(tensors, str(path), metadata={"format": "pt", "applies_to": "final hidden state at the last real token"})
    return path


def adapter_dir(folder: str | Path) -> Path:
    """The LoRA adapter's folder inside a reward entry of kind "adapter"."""
    return Path(folder) / ADAPTER_DIR


def load_score_head(folder: str | Path) -> dict[str, "torch.Tensor"]:
    """`weight` (1, H) and, when the head has one, `bias` (1,), from a reward entry's folder."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / SCORE_HEAD_FILE))
