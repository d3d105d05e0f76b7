"""Sampling every compared model the same way (stage 04): the same prompts, settings and seed for all.

Rows are prompt-major: row i·K + j is sample j of prompt i, drawn after `torch.manual_seed(seed)`, so sample
(i, j) of one model and sample (i, j) of another are a pair. The frontier samples the RL runs' snapshots with
the same settings and seed on fewer prompts and samples (`Samples.subset` takes the matching rows of a
model sampled on all of them).

`kl_sums` gives each sample's Σ_t [log π(y_t) − log π_ref(y_t)] over its tokens (EOS included), both at the
sampling temperature: the k1 estimate whose mean over samples drawn from π is KL(π || π_ref) per response
(rlhf/eval/metrics.py). It needs π_ref to read the ids as π does (`same_tokenization`).

What is measured on a model's samples is kept beside them (`Judged`, per sample): `measure_kl` loads a
reference model once for every sample set, `judge_samples` runs the reward model and both toxicity scorers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhf.errors import UserError


@dataclass(frozen=True)
class SamplingSettings:
    """How every model samples."""

    samples_per_prompt: int  # K
    temperature: float  # also the temperature of the log-probs of the KL estimates
    top_p: float
    max_new_tokens: int
    max_prompt_length: int  # prompts keep their last N tokens (fewer for a model with a shorter context)
    seed: int
    batch_size: int  # rows per generate / forward batch


@dataclass
class Samples:
    """One model's K samples per prompt, prompt-major (P·K rows)."""

    prompt_index: list[int]  # (P·K,) which prompt each row is (row i·K + j: i)
    rows: list[list[int]]  # (P·K,) prompt ids, the model's own tokenization
    responses: list[list[int]]  # (P·K,) sampled ids, the stop token included when generated
    texts: list[str]  # (P·K,) decoded samples
    has_eos: list[bool]  # (P·K,)
    logprob_sums: np.ndarray  # (P·K,) Σ_t log π(sample) at the sampling temperature

    def subset(self, samples_per_prompt: int, n_prompts: int, k: int) -> "Samples":
        """The first `k` samples of each of the first `n_prompts` prompts (these rows hold `samples_per_prompt`
        samples per prompt), still prompt-major.

        >>> s = Samples([0, 0, 0, 1, 1, 1], [[0]] * 6, [[1]] * 6, list("abcdef"), [True] * 6, np.arange(6.0))
        >>> sub = s.subset(3, 2, 2)  # prompts 0 and 1, samples 0 and 1 of each
        >>> sub.texts, sub.prompt_index
        (['a', 'b', 'd', 'e'], [0, 0, 1, 1])
        """
        idx = subset_rows(samples_per_prompt, n_prompts, k)
        return Samples([self.prompt_index[i] for i in idx], [self.rows[i] for i in idx],
                       [self.responses[i] for i in idx], [self.texts[i] for i in idx],
                       [self.has_eos[i] for i in idx], np.asarray(self.logprob_sums)[idx])


def subset_rows(samples_per_prompt: int, n_prompts: int, k: int) -> list[int]:
    """Row numbers of the first `k` samples of the first `n_prompts` prompts in prompt-major rows of
    `samples_per_prompt` samples per prompt."""
    if k > samples_per_prompt:
        raise ValueError(f"cannot take {k} samples per prompt of {samples_per_prompt}")
    return [i * samples_per_prompt + j for i in range(n_prompts) for j in range(k)]


@dataclass
class Judged:
    """A model's samples and what was measured on each of them, all (N,) in the rows' order."""

    samples: Samples
    tokenizer: Any  # the model's, to check a reference model reads its ids alike
    kl: dict[str, np.ndarray | None] = field(default_factory=dict)  # {"base"/"sft": Σ_t [log π − log π_ref]};
    # None where the reference's tokenization differs
    rewards: np.ndarray | None = None  # normalized RM scores
    toxicity: np.ndarray | None = None  # the held-out judge's scores
    reward_toxicity: np.ndarray | None = None  # the reward's toxicity scorer's scores

    def subset(self, samples_per_prompt: int, n_prompts: int, k: int) -> "Judged":
        """The same rows as `Samples.subset`, with their measures."""
        idx = subset_rows(samples_per_prompt, n_prompts, k)
        pick = (lambda a: None if a is None else np.asarray(a)[idx])
        return Judged(self.samples.subset(samples_per_prompt, n_prompts, k), self.tokenizer,
                      {name: pick(v) for name, v in self.kl.items()}, pick(self.rewards), pick(self.toxicity),
                      pick(self.reward_toxicity))


def prompt_budget(model: Any, settings: SamplingSettings, where: str) -> int:
    """Prompt tokens a model keeps: prompt + reply must fit its positions (a short context keeps the newest)."""
    from rlhf.models import context_length

    length = context_length(model, settings.max_prompt_length + settings.max_new_tokens) - settings.max_new_tokens
    if length < 1:
        raise UserError(f"{where}: its context is too short for max_new_tokens {settings.max_new_tokens}")
    return length


def sample(model: Any, tokenizer: Any, prompts: list[dict], settings: SamplingSettings, where: str) -> Samples:
    """K samples of every prompt (`prompt` schema records) from the seed, and their log-probabilities."""
    import torch

    from rlhf.eval.likelihood import response_logprob_sums
    from rlhf.generation import encode_prompts, generate_ids

    prompt_ids = encode_prompts(tokenizer, [p["messages"] for p in prompts], prompt_budget(model, settings, where))
    K = settings.samples_per_prompt
    rows = [ids for ids in prompt_ids for _ in range(K)]
    torch.manual_seed(settings.seed)  # the same seed for every model
    responses, has_eos = generate_ids(model, tokenizer, rows, max_new_tokens=settings.max_new_tokens, do_sample=True,
                                      temperature=settings.temperature, top_p=settings.top_p,
                                      batch_size=settings.batch_size)
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
    logprob_sums = response_logprob_sums(model, tokenizer.pad_token_id, rows, responses, settings.temperature,
                                         settings.batch_size)
    return Samples([i for i in range(len(prompts)) for _ in range(K)], rows, responses, texts, has_eos, logprob_sums)


def same_tokenization(tok_a: Any, tok_b: Any) -> bool:
    """Token ids and prompt rendering mean the same under both tokenizers (needed for a KL between the models)."""
    return tok_a.get_vocab() == tok_b.get_vocab() and tok_a.chat_template == tok_b.chat_template


def kl_sums(samples: Samples, ref_model: Any, ref_pad_id: int, settings: SamplingSettings) -> np.ndarray:
    """(N,) Σ_t [log π − log π_ref] of each sample (module docstring); π_ref must share π's tokenization."""
    from rlhf.eval.likelihood import response_logprob_sums

    ref_sums = response_logprob_sums(ref_model, ref_pad_id, samples.rows, samples.responses, settings.temperature,
                                     settings.batch_size)
    return np.asarray(samples.logprob_sums) - ref_sums


def measure_kl(name: str, ref: str, registry: Any, targets: list[Judged], settings: SamplingSettings, *,
               own: Judged | None = None, trust_remote_code: bool = False) -> None:
    """Set `t.kl[name]` of every target: Σ_t [log π − log π_ref] per sample with π_ref = the model `ref`, loaded
    once (None where its tokenization differs); `own`, the reference's own samples, gets zeros."""
    import gc

    from rlhf.models import load_chat_model

    model, tokenizer, _ = load_chat_model(ref, registry, trust_remote_code=trust_remote_code)
    for t in targets:
        if t is own:
            t.kl[name] = np.zeros(len(t.samples.texts))
        elif same_tokenization(t.tokenizer, tokenizer):
            t.kl[name] = kl_sums(t.samples, model, tokenizer.pad_token_id, settings)
        else:
            t.kl[name] = None
    del model
    gc.collect()


def judge_samples(targets: list[Judged], prompts: list[dict], rm: Any, reward_scorer: Any, judge: Any) -> None:
    """Score every target's samples with the reward model (against their prompts), the reward's toxicity scorer and
    the held-out judge (once when they are the same scorer)."""
    for t in targets:
        t.rewards = rm.score([prompts[i]["messages"] for i in t.samples.prompt_index], t.samples.texts)
        t.toxicity = judge.score(t.samples.texts)
        t.reward_toxicity = t.toxicity if reward_scorer is judge else reward_scorer.score(t.samples.texts)
