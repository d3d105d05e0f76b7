"""Score (prompt, response) pairs with a registered reward entry of either kind, normalized as in PPO.

    rm = load_reward_scorer(registry.get("reward:latest"), registry)
    rm.score([[{"role": "user", "content": "hi"}]], ["hello!"])   # -> array([0.42])

Kinds (`rlhf.reward_model` documents the artifacts): `model` is a sequence-classification
model; `adapter` is a LoRA adapter on the causal-LM `base_model` (a registry ref) plus a
score head read at the last real token. Both render the conversation through the reward
entry's chat template (`conversation_ids`) and score it with `score_ids`, the code stage 02
evaluates with. Scores are normalized with the entry's `reward_mean` / `reward_std`, as the
PPO reward is: `(raw − reward_mean) / reward_std`.

The base is loaded in full precision (an adapter trained on a 4-bit base scores within
quantization noise of what PPO saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf.errors import RegistryError
from rlhf.registry import Entry, Registry


@dataclass
class RewardScorer:
    """A loaded reward model; `head` is None for kind `model`, the score head tensors for kind `adapter`."""

    ref: str
    model: Any
    tokenizer: Any
    head: dict[str, Any] | None
    reward_mean: float
    reward_std: float
    max_length: int | None
    batch_size: int

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray:
        """(N,) raw scores of each prompt (messages) answered by its response text."""
        from rlhf.reward_model import conversation_ids, score_ids

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return np.zeros(0)
        rows = [conversation_ids(self.tokenizer, [*p, {"role": "assistant", "content": r}], self.max_length)
                for p, r in zip(prompts, responses)]
        scores = score_ids(self.model, rows, self.tokenizer.pad_token_id, head=self.head, batch_size=self.batch_size)
        return scores.numpy().astype(np.float64)

    def score(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray:
        """(N,) normalized scores: (raw − reward_mean) / reward_std."""
        return (self.raw(prompts, responses) - self.reward_mean) / self.reward_std


def load_reward_scorer(entry: Entry, registry: Registry, *, max_length: int | None = 512, batch_size: int = 32,
                       trust_remote_code: bool = False) -> RewardScorer:
    """Load a `reward` entry for scoring on the default device (see the module docstring).

    Conversations keep their last `max_length` tokens (capped at the model's positions).
    """
    from rlhf.models import context_length, device, fit_embeddings, load_model, load_tokenizer, resolve_model
    from rlhf.reward_model import adapter_dir, load_score_head

    if entry.stage != "reward":
        raise RegistryError(f"{entry.ref}: is a '{entry.stage}' entry, not a 'reward' entry")
    kind = entry.config.get("reward_kind", "model")
    has_tokenizer = (entry.path / "tokenizer_config.json").is_file()
    if kind == "adapter":
        from peft import PeftModel

        base_ref = entry.config.get("base_model")
        if not base_ref:
            raise RegistryError(f"{entry.ref}: reward_kind 'adapter' but its config names no base_model")
        base = resolve_model(base_ref, registry, stages=("sft", "pretrain"))
        tokenizer = load_tokenizer(str(entry.path) if has_tokenizer else base.path, trust_remote_code)
        model = load_model(base.path, trust_remote_code=trust_remote_code)
        fit_embeddings(model, tokenizer)
        model = PeftModel.from_pretrained(model, str(adapter_dir(entry.path))).merge_and_unload()
        head = load_score_head(entry.path)
    elif kind == "model":
        tokenizer = load_tokenizer(str(entry.path), trust_remote_code)
        model = load_model(str(entry.path), kind="score", trust_remote_code=trust_remote_code)
        model.config.pad_token_id = tokenizer.pad_token_id
        head = None
    else:
        raise RegistryError(f"{entry.ref}: unknown reward_kind {kind!r}; expected 'model' or 'adapter'")
    model.to(device()).eval()
    std = float(entry.metrics.get("reward_std", 1.0)) or 1.0
    return RewardScorer(ref=entry.ref, model=model, tokenizer=tokenizer, head=head,
                        reward_mean=float(entry.metrics.get("reward_mean", 0.0)), reward_std=std,
                        max_length=context_length(model, max_length) if max_length else max_length,
                        batch_size=batch_size)
