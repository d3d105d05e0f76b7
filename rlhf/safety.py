"""Toxicity scoring: one interface (`texts -> scores in [0, 1]`) for the PPO reward, the comparison and the chat filter.

    >>> scorer = load_scorer("profanity-check")
    >>> scorer.score(["have a lovely day", ""]).tolist()  # doctest: +SKIP
    [0.03, 0.0]

Backend specs (`load_scorer(spec)`; `scorer.spec` is the backend actually used, for registry configs):

- `detoxify:original` (or `unbiased`, `multilingual`, `original-small`, `unbiased-small`): the
  `detoxify.Detoxify` model. Its checkpoint comes from the torch hub cache
  (`<torch.hub.get_dir()>/checkpoints/`, downloaded from GitHub on first use) and the config and tokenizer
  of its base architecture (e.g. `bert-base-uncased`) from the Hugging Face cache or hub.
  `scripts/fetch_assets.py --detoxify original` fills both caches; then set `HF_HUB_OFFLINE=1`.
- `detoxify:/path/model.ckpt` or `detoxify:/path/model.ckpt?config=/path/folder`: a detoxify-format
  checkpoint on disk (a dict with `config` and `state_dict`). `?config=` names a local folder holding the
  architecture's `config.json` (with the checkpoint's `num_labels`) and tokenizer files, for fully offline use.
- `profanity-check`: alt-profanity-check, a linear model over word n-grams shipped inside its wheel.
  Always available offline; it sees profanity more than subtle toxicity.
- `better-profanity`: the better-profanity package's word list (with leetspeak spellings of each word), inside
  its wheel: 1.0 when a text contains a listed word or phrase, else 0.0. Offline; pure Python, its time grows
  with the number of words, so it suits short responses. Meant as a held-out judge (below), not as a reward.
- `auto`, `auto:NAME`, `auto:/path/model.ckpt[?config=DIR]`: detoxify (`original` unless named) when its
  checkpoint (and config folder, when given) is already on disk; else, for a NAME, when detoxify can download it
  now: a bounded probe (`rlhf.hub.unreachable`) of the checkpoint's URL and, unless `HF_HUB_OFFLINE` is set, of
  the hub that serves its base model's config and tokenizer; then detoxify's own loader downloads it into the
  torch hub cache. Otherwise (or when that download fails) profanity-check. The choice is made once, in
  `load_scorer`, and one log line says which scorer and why; `scorer.reason` keeps the why and `describe()`
  records it in the registry entry. A scorer never changes backend afterwards.

Families, and the held-out judge (`scorer_family`, `heldout_judge_spec`). A policy trained against one scorer
can learn that scorer's blind spots, so the judge that measures it should be of another family;
`heldout_judge_spec(reward_spec)` picks one:

| family | specs | how it scores | learned from |
|---|---|---|---|
| `detoxify-original` | `detoxify:original`, `detoxify:original-small` | BERT / ALBERT classifier | Jigsaw 2018 (Wikipedia comments) |
| `detoxify-unbiased` | `detoxify:unbiased`, `detoxify:unbiased-small` | RoBERTa / ALBERT classifier | Jigsaw 2019 (Civil Comments); detoxify's changelog says the current RoBERTa weights also saw the 2018 data |
| `detoxify-multilingual` | `detoxify:multilingual` | XLM-R classifier | both of the above, translated |
| `detoxify-checkpoint` | `detoxify:/path/model.ckpt[?config=DIR]` | a detoxify-format classifier | unknown here |
| `profanity-check` | `profanity-check` | linear SVM on word n-grams | Davidson et al.'s tweets + Jigsaw 2018 |
| `lexicon` | `better-profanity` | word list | nothing (hand-made list) |

The judge of original is unbiased and the reverse (another architecture, label set and main data set; not
disjoint data, see above); of profanity-check the lexicon and the reverse; of multilingual and of a local
checkpoint the lexicon, the one family that certainly learned from none of their data.

Findings about detoxify 0.5.4 that shape this module:

- Loading. torch >= 2.6 defaults `torch.load(weights_only=True)`. detoxify 0.5.4 passes
  `weights_only=False` itself, to both `torch.load` and `torch.hub.load_state_dict_from_url`, so its own
  loader needs no help; a checkpoint holding only tensors, dicts and strings (like the one the tests build)
  would load under `weights_only=True` as well.
- Offline. `Detoxify(checkpoint=..., huggingface_config_path=DIR)` still calls
  `config_class.from_pretrained(arch.args.model_type)` first, which for the released checkpoints is a hub id
  (`bert-base-uncased`): offline that retries for ~25 s and fails. With `?config=DIR` we therefore load the
  checkpoint, point `arch.args.model_type` at DIR and hand the result to `Detoxify` in memory, so every
  lookup stays local while detoxify's own loader builds the model.
- Truncation. `Detoxify.predict` tokenizes with `truncation=True`, which truncates at the tokenizer's
  `model_max_length`; a tokenizer folder without that setting would not truncate at all, so it is clamped
  to the model's position embeddings.

`import rlhf.safety` imports none of torch, transformers, detoxify, sklearn or better_profanity; `load_scorer` does.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhf import hub
from rlhf.errors import ConfigError

logger = logging.getLogger(__name__)

DETOXIFY_MODELS = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")
CONFIG_SEP = "?config="
MAX_LABEL = "max"  # label option: the max over all of a model's classes
PROBE_TIMEOUT_S = 3.0  # each reachability probe of `auto` (rlhf.hub.unreachable gives it 2 s more in all)

# The family of each named spec, and the default held-out judge of each family (module docstring's table).
_FAMILIES = {
    "profanity-check": "profanity-check",
    "better-profanity": "lexicon",
    "detoxify:original": "detoxify-original",
    "detoxify:original-small": "detoxify-original",
    "detoxify:unbiased": "detoxify-unbiased",
    "detoxify:unbiased-small": "detoxify-unbiased",
    "detoxify:multilingual": "detoxify-multilingual",
}
_JUDGE_OF_FAMILY = {
    "detoxify-original": "detoxify:unbiased",
    "detoxify-unbiased": "detoxify:original",
    "detoxify-multilingual": "better-profanity",
    "detoxify-checkpoint": "better-profanity",
    "profanity-check": "better-profanity",
    "lexicon": "profanity-check",
}


class ToxicityScorer:
    """Scores texts in [0, 1]; subclasses implement `_score_batch` for non-empty strings.

    `spec` is the resolved backend spec (what `load_scorer` would need to rebuild this scorer),
    `requested` the spec the caller asked for (e.g. `auto`), `label` the output class used,
    `reason` why this backend (what `auto` found; a named spec is its own reason).
    """

    spec: str
    requested: str
    label: str
    threshold: float
    batch_size: int
    reason: str = "named in the spec"

    @property
    def name(self) -> str:
        return f"{self.spec} ({self.label})"

    def describe(self) -> dict[str, Any]:
        """What a registry entry records about the scorer it used."""
        return {"spec": self.spec, "requested": self.requested, "label": self.label, "threshold": self.threshold,
                "reason": self.reason}

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) float64 scores in [0, 1]; empty strings score 0 without reaching the model."""
        texts = _check_texts(texts)
        scores = np.zeros(len(texts), dtype=np.float64)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        # longest first, so each batch pads to similar lengths
        todo.sort(key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            scores[idx] = self._score_batch([texts[i] for i in idx])
        return np.clip(scores, 0.0, 1.0)

    def flags(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) bool: score >= threshold (the chat filter's rule)."""
        return self.score(texts) >= self.threshold

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


def _check_single_output(spec: str, label: str) -> None:
    if label not in ("toxicity", MAX_LABEL):
        raise ConfigError(f"toxicity label {label!r}: {spec} has one output; use 'toxicity' or 'max'")


class ProfanityCheckScorer(ToxicityScorer):
    def __init__(self, *, requested: str, label: str, threshold: float, batch_size: int):
        _check_single_output("profanity-check", label)
        from profanity_check import predict_prob  # loads its sklearn model from the wheel

        self._predict_prob = predict_prob
        self.spec, self.requested, self.label = "profanity-check", requested, label
        self.threshold, self.batch_size = threshold, batch_size

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._predict_prob(texts), dtype=np.float64)


class BetterProfanityScorer(ToxicityScorer):
    """1.0 when a text holds a word or phrase of better-profanity's list (or a leetspeak spelling of one), else 0.0."""

    def __init__(self, *, requested: str, label: str, threshold: float, batch_size: int):
        _check_single_output("better-profanity", label)
        from better_profanity import Profanity  # reads the word list inside its wheel

        self._lexicon = Profanity()  # an instance of our own: the package's module-level one is shared and mutable
        if all(len(v) == 1 for variants in self._lexicon.CHARS_MAPPING.values() for v in variants):
            self._lexicon.CENSOR_WORDSET = _WordIndex(self._lexicon.CENSOR_WORDSET, self._lexicon.CHARS_MAPPING)
        self.spec, self.requested, self.label = "better-profanity", requested, label
        self.threshold, self.batch_size = threshold, batch_size

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return np.array([float(self._lexicon.contains_profanity(t)) for t in texts], dtype=np.float64)


class _WordIndex:
    """better-profanity's word list (its VaryingString entries) for `word in index`, with the package's answer.

    The package tests every word of a text against its whole list, one Python comparison per entry, which is
    slow for the thousands of samples of a comparison. When every spelling in the character map is one character
    (the caller checks), an entry can only equal words of its own length whose first character is one of the
    spellings of its first letter, so the index compares a word with those entries alone: the same answer.
    """

    def __init__(self, words: list, char_map: dict[str, tuple[str, ...]]):
        self._words = list(words)
        self._buckets: dict[tuple[int, str], list] = {}
        for w in self._words:
            text = str(w)
            for first in char_map.get(text[:1], (text[:1],)):
                self._buckets.setdefault((len(text), first), []).append(w)

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str):
            return any(w == word for w in self._words)
        return any(w == word for w in self._buckets.get((len(word), word[:1]), ()))

    def __len__(self) -> int:
        return len(self._words)

    def __iter__(self):
        return iter(self._words)


class DetoxifyScorer(ToxicityScorer):
    def __init__(self, detox: Any, *, spec: str, requested: str, label: str, threshold: float, batch_size: int):
        if label != MAX_LABEL and label not in detox.class_names:
            raise ConfigError(
                f"toxicity label {label!r} is not a class of {spec}; expected one of {detox.class_names} or 'max'"
            )
        _clamp_max_length(detox.tokenizer, detox.model.config)
        self.detox = detox
        self.spec, self.requested, self.label = spec, requested, label
        self.threshold, self.batch_size = threshold, batch_size

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        out = self.detox.predict(texts)  # {class: list of floats, or one float when len(texts) == 1}
        if self.label == MAX_LABEL:
            return np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in out.values()]).max(axis=0)
        return np.asarray(out[self.label], dtype=np.float64).reshape(-1)


def load_scorer(
    spec: str,
    *,
    device: str | None = None,
    batch_size: int = 32,
    label: str = "toxicity",
    threshold: float = 0.5,
) -> ToxicityScorer:
    """Build the scorer `spec` names (see the module docstring); `device` defaults to CUDA when available.

    `label` is the detoxify class used as the score (`toxicity`, `insult`, ...) or `max` over all classes.
    """
    if batch_size < 1:
        raise ConfigError(f"toxicity batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"toxicity threshold must be in [0, 1], got {threshold}")
    common = dict(requested=spec, label=label, threshold=threshold, batch_size=batch_size)
    backend, _, arg = spec.partition(":")
    if spec == "profanity-check":
        return ProfanityCheckScorer(**common)
    if spec == "better-profanity":
        return BetterProfanityScorer(**common)
    if backend == "detoxify" and arg:
        return _load_detoxify(arg, device=device, **common)
    if backend == "auto":
        return _load_auto(arg or "original", device=device, **common)
    raise ConfigError(
        f"unknown toxicity scorer {spec!r}; expected 'profanity-check', 'better-profanity', 'auto[:NAME|:PATH]', "
        f"'detoxify:NAME' (NAME one of {', '.join(DETOXIFY_MODELS)}) or 'detoxify:/path/model.ckpt[?config=DIR]'"
    )


def _load_auto(target: str, *, device: str | None, **common: Any) -> ToxicityScorer:
    """`auto:target` (module docstring): detoxify when on disk or downloadable now, else profanity-check."""
    found = _detoxify_on_disk(target)
    if found is not None:
        return _chosen(_load_detoxify(target, device=device, **common), f"checkpoint on disk at {found}")
    blocker = _download_blocker(target)
    if blocker is None:
        try:
            scorer = _load_detoxify(target, device=device, **common)
        except ConfigError as exc:
            blocker = f"its download failed ({exc.__cause__ or exc})"
        else:
            where = detoxify_cache_path(target)
            return _chosen(scorer, f"not on disk; downloaded by detoxify's loader into {where}")
    return _chosen(ProfanityCheckScorer(**common), f"no detoxify:{target} checkpoint on disk, and {blocker}")


def _download_blocker(target: str) -> str | None:
    """None when detoxify can download `target` now, else why not (bounded probes, module docstring)."""
    if target not in DETOXIFY_MODELS:
        return "a checkpoint path is never downloaded"
    from urllib.parse import urlsplit

    from detoxify.detoxify import MODEL_URLS
    from huggingface_hub import constants

    url = MODEL_URLS[target]
    why = hub.unreachable(PROBE_TIMEOUT_S, url)
    if why is not None:
        return f"its host {urlsplit(url).hostname} is unreachable ({why})"
    if not constants.HF_HUB_OFFLINE:  # offline, the base model's config and tokenizer must come from the cache
        why = hub.unreachable(PROBE_TIMEOUT_S)
        if why is not None:
            return (f"the Hugging Face hub at {constants.ENDPOINT}, which serves its base model's config and "
                    f"tokenizer, is unreachable ({why})")
    return None


def _chosen(scorer: ToxicityScorer, reason: str) -> ToxicityScorer:
    """Record and log (one line) what `auto` chose and why."""
    scorer.reason = reason
    if scorer.spec == "profanity-check":
        logger.warning("toxicity scorer auto: using profanity-check (%s; scripts/fetch_assets.py --detoxify NAME "
                       "puts a checkpoint on disk where there is internet)", reason)
    else:
        logger.info("toxicity scorer auto: using %s (%s)", scorer.spec, reason)
    return scorer


def scorer_family(spec: str) -> str:
    """The family of a resolved scorer spec (the module docstring's table): `detoxify-original`,
    `detoxify-unbiased`, `detoxify-multilingual`, `detoxify-checkpoint`, `profanity-check` or `lexicon`."""
    if spec in _FAMILIES:
        return _FAMILIES[spec]
    backend, _, arg = spec.partition(":")
    if backend == "auto":
        raise ConfigError(f"toxicity scorer {spec!r} is resolved when it loads; pass the spec it resolved to "
                          "(scorer.spec, or the ppo entry's toxicity_scorer.spec)")
    if backend == "detoxify" and arg and arg not in DETOXIFY_MODELS:
        return "detoxify-checkpoint"
    raise ConfigError(f"unknown toxicity scorer {spec!r}; expected one of {', '.join(_FAMILIES)} "
                      "or 'detoxify:/path/model.ckpt[?config=DIR]'")


def heldout_judge_spec(reward_spec: str) -> str:
    """The scorer spec that judges toxicity by default for a policy whose reward used `reward_spec`: one of another
    family (module docstring). `reward_spec` is the resolved spec (`scorer.spec`, or the ppo entry's
    `toxicity_scorer.spec`), never `auto`.

    >>> heldout_judge_spec("profanity-check"), heldout_judge_spec("detoxify:original")
    ('better-profanity', 'detoxify:unbiased')
    """
    return _JUDGE_OF_FAMILY[scorer_family(reward_spec)]


def _load_detoxify(arg: str, *, device: str | None, **common: Any) -> DetoxifyScorer:
    import torch
    from detoxify import Detoxify

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if arg in DETOXIFY_MODELS:
        try:
            detox = Detoxify(model_type=arg, device=device)
        except OSError as exc:  # urllib's URLError and the hub's connection errors are OSErrors
            raise ConfigError(
                f"cannot load detoxify:{arg}: {exc}. Offline, run scripts/fetch_assets.py --detoxify {arg} where "
                "there is internet and set HF_HUB_OFFLINE=1, or pass detoxify:/path/model.ckpt?config=DIR, "
                "or use 'profanity-check'"
            ) from exc
        return DetoxifyScorer(detox, spec=f"detoxify:{arg}", **common)

    ckpt, config_dir = _split_path_spec(arg)
    if not ckpt.is_file():
        raise ConfigError(f"detoxify checkpoint {ckpt} does not exist (expected a file, or one of {DETOXIFY_MODELS})")
    if config_dir is None:
        try:
            detox = Detoxify(checkpoint=str(ckpt), device=device)
        except (OSError, ValueError) as exc:  # not a detoxify checkpoint, or its base model is not reachable
            raise ConfigError(
                f"cannot load detoxify checkpoint {ckpt}: {exc}. Offline, add ?config=DIR with the base model's "
                "config.json and tokenizer files"
            ) from exc
        return DetoxifyScorer(detox, spec=f"detoxify:{ckpt}", **common)
    if not (config_dir / "config.json").is_file():
        raise ConfigError(f"detoxify config folder {config_dir} has no config.json")
    # weights_only=False as detoxify itself does: released checkpoints are Lightning checkpoints
    loaded = torch.load(ckpt, map_location="cpu", weights_only=False)
    try:
        num_classes = loaded["config"]["arch"]["args"]["num_classes"]
        loaded["state_dict"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{ckpt} is not a detoxify checkpoint (needs 'config.arch.args' and 'state_dict')") from exc
    _check_num_labels(config_dir, num_classes)
    loaded["config"]["arch"]["args"]["model_type"] = str(config_dir)  # see "Offline" in the module docstring
    buf = io.BytesIO()
    torch.save(loaded, buf)
    del loaded
    buf.seek(0)
    detox = Detoxify(checkpoint=buf, device=device, huggingface_config_path=str(config_dir))
    return DetoxifyScorer(detox, spec=f"detoxify:{ckpt}{CONFIG_SEP}{config_dir}", **common)


def _split_path_spec(arg: str) -> tuple[Path, Path | None]:
    """`/p/model.ckpt?config=/p/dir` -> (absolute checkpoint, absolute config folder or None)."""
    path, sep, config = arg.partition(CONFIG_SEP)
    if sep and not config:
        raise ConfigError(f"detoxify spec {arg!r}: '?config=' needs a folder")
    ckpt = Path(path).expanduser().resolve()
    return ckpt, Path(config).expanduser().resolve() if config else None


def _check_num_labels(config_dir: Path, num_classes: int) -> None:
    cfg = json.loads((config_dir / "config.json").read_text())
    num_labels = len(cfg["id2label"]) if "id2label" in cfg else cfg.get("num_labels", 2)
    if num_labels != num_classes:
        raise ConfigError(
            f"{config_dir / 'config.json'} describes {num_labels} labels but the checkpoint has {num_classes} "
            f"classes; save the config with num_labels={num_classes}"
        )


def detoxify_cache_path(name: str) -> Path:
    """Where torch.hub keeps detoxify's `name` checkpoint (torch.hub.load_state_dict_from_url's rule)."""
    import torch
    from detoxify.detoxify import MODEL_URLS

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(MODEL_URLS[name])


def _detoxify_on_disk(target: str) -> Path | None:
    """The checkpoint file `auto:target` would use, when it (and its config folder) exist; else None."""
    if target in DETOXIFY_MODELS:
        path = detoxify_cache_path(target)
        return path if path.is_file() else None
    ckpt, config_dir = _split_path_spec(target)
    if ckpt.is_file() and (config_dir is None or config_dir.is_dir()):
        return ckpt
    return None


def _clamp_max_length(tokenizer: Any, model_config: Any) -> None:
    """Make `truncation=True` cut at what the model's position embeddings can take."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not limit:
        return
    if getattr(model_config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= 2  # these models offset positions by padding_idx + 1
    if tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"texts must be a list of strings, got a single {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts
