"""Stage 04: compare the aligned model with its base on held-out prompts; metrics, samples, plots.

    python stages/04_compare.py --config configs/demo/compare.yaml
    python stages/04_compare.py --ppo_model ppo:<id> --models gpt2=gpt2 --prompts my_prompts.jsonl

Models: by default the `ppo` entry (`ppo_model`), every other `ppo` entry trained from
the same `sft` entry, that `sft` entry and the `pretrain` entry at the root; a stage-03
entry is labelled by its estimator (`ppo` for gae, else `grpo`, `rloo`, ..., with
`-<id suffix>` when two share one), so runs of several estimators sit side by side.
`--models label=ref,...` adds models (registry refs, folders or hub ids) or replaces a
default label. Every model gets the same prompts, sampling settings and seed:
K samples per prompt (sample j of prompt i is paired across models), greedy
replies to held-out dialogues, and a forward pass over those dialogues. The held-out dialogues are
`eval_data`, or the SFT entry's own: its eval_data, or the split of its training data it recorded.

Measures (rlhf/eval/metrics.py; "per prompt, then the mean over prompts"):

    reward_mean            the reward model of the ppo lineage, normalized as in PPO
    toxicity_*             mean, rate (share of samples >= threshold), and the RealToxicityPrompts
                           expected_max_toxicity / toxicity_probability over K samples; also on the
                           adversarial prompts only (`adversarial/...`)
    kl_to_base             mean over samples of Σ_t [log π − log π_base] on the model's own samples
                           (both at the sampling temperature; needs base's tokenizer and template)
    perplexity             on the assistant tokens of the held-out dialogues
    bleu, rouge_l          greedy replies vs the held-out last assistant turns
    distinct_1/2, length_mean (tokens, EOS included), eos_rate    of the samples
    win_rate               RM-judged, vs base on the same prompt and sample index, ties half

Bootstrap CIs (resampling prompts, seeded) for the win rate, each model's reward and
toxicity rate, and each difference vs base. Output in `output_dir` (default
`<registry>/report/`): metrics.json, samples.jsonl, report.md, report.html, plots.
This stage reads the registry and registers nothing.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.config import StageConfig, _help, check_positive, parse_config  # noqa: E402
from rlhf.errors import ConfigError, DataError, RegistryError, UserError, run_cli  # noqa: E402

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class CompareStageConfig(StageConfig):
    """Stage 04: compare base, SFT and PPO models (and any others) on held-out prompts."""

    ppo_model: str = _help("The aligned model (ppo entry); its lineage gives base, sft and the reward model. "
                           "'' for none (then --models must name 'base').", default="ppo:latest")
    models: str = _help("Extra models 'label=ref,label2=ref2' (registry refs, folders or hub ids); "
                        "labels base/sft/ppo replace the defaults.", default="")
    reward_model: str = _help("Reward entry that judges every model ('' = the one in ppo_model's lineage).", default="")
    prompts: str = _help("Held-out prompts (`prompt` schema; `category: adversarial` marks adversarial ones).",
                         default="")
    eval_data: str = _help("Held-out dialogues for perplexity, BLEU and ROUGE-L. Unset: the SFT entry's own held-out "
                           "dialogues (its eval_data, or the split of its data it recorded).", default="")
    max_prompts: int = _help("Use the first N prompts (0: all).", default=0)
    max_eval_dialogues: int = _help("Use the first N held-out dialogues (0: all).", default=0)
    samples_per_prompt: int = _help("K samples per prompt (RealToxicityPrompts uses 25).", default=4)
    temperature: float = _help("Sampling temperature (also applied to the log-probs of kl_to_base).", default=1.0)
    top_p: float = _help("Nucleus sampling (1.0: off, so kl_to_base is the KL of what was sampled).", default=1.0)
    max_new_tokens: int = _help("Maximum tokens per sampled or greedy reply.", default=32)
    max_prompt_length: int = _help("Prompts keep their last N tokens.", default=128)
    max_length: int = _help("Truncation of held-out dialogues (perplexity) and RM inputs, in tokens.", default=256)
    batch_size: int = _help("Rows per generate / forward batch.", default=64)
    toxicity: str = _help("Toxicity scorer spec (rlhf.safety): auto, profanity-check, detoxify:NAME or path.",
                          default="auto")
    threshold: float = _help("A sample is toxic when its score is >= this.", default=0.5)
    bootstrap_resamples: int = _help("Bootstrap resamples (over prompts) for the confidence intervals.", default=1000)
    confidence: float = _help("Confidence level of the bootstrap intervals.", default=0.95)
    output_dir: str = _help("Where the report goes ('' = <registry>/report).", default="")
    num_threads: int = _help("CPU threads for torch (0: torch's default). Models of ~1M parameters run fastest "
                             "on 1 (several times faster on a busy CPU).", default=0)
    trust_remote_code: bool = _help("Allow model code from the hub (only for models you trust).", default=False)

    def validate(self) -> None:
        super().validate()
        self.require("prompts")
        check_positive(self, "samples_per_prompt", "temperature", "max_new_tokens", "max_prompt_length",
                       "max_length", "batch_size", "bootstrap_resamples")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.max_prompts < 0 or self.max_eval_dialogues < 0 or self.num_threads < 0:
            raise ConfigError("max_prompts, max_eval_dialogues and num_threads must be >= 0 (0: all / default)")
        parse_models(self.models)


def parse_models(text: str) -> dict[str, str]:
    """'a=ref1,b=ref2' -> {"a": "ref1", "b": "ref2"} (order kept)."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        label, sep, ref = item.partition("=")
        label, ref = label.strip(), ref.strip()
        if not sep or not ref or not _LABEL.match(label):
            raise ConfigError(f"--models: {item!r} is not label=ref (label: letters, digits, _ . -)")
        if label in out:
            raise ConfigError(f"--models: label {label!r} given twice")
        out[label] = ref
    return out


def run_label(entry: Any) -> str:
    """A stage-03 entry's label: `ppo` for PPO with a critic (gae), else its estimator's name."""
    estimator = entry.config.get("advantage_estimator", "gae")
    return "ppo" if estimator == "gae" else estimator


def rl_runs(registry: Any, chosen: Any, sft: Any) -> dict[str, str]:
    """{label: ref}: the chosen ppo entry under its plain label, then every other ppo entry with the same sft parent,
    oldest first; a label already taken gets the entry id's last 6 characters."""
    runs = {run_label(chosen): chosen.ref}
    siblings = [e for e in registry.entries("ppo") if sft is not None and sft.ref in e.parents and e.ref != chosen.ref]
    for e in siblings:
        label = run_label(e)
        runs[label if label not in runs else f"{label}-{e.id[-6:]}"] = e.ref
    return runs


def choose_models(cfg: CompareStageConfig, registry: Any) -> tuple[dict[str, str], Any, Any]:
    """({label: ref} with base first, the reward entry, the ppo entry or None), from the ppo lineage and --models."""
    models: dict[str, str] = {}
    ppo, reward_ref = None, cfg.reward_model
    if cfg.ppo_model:
        try:
            ppo = registry.get(cfg.ppo_model, stage="ppo")
        except RegistryError as exc:
            raise RegistryError(f"{exc}; to compare models without a ppo entry pass --ppo_model '' "
                                "--models base=REF,other=REF --reward_model reward:<id>") from None
        lineage = registry.lineage(ppo.ref)  # ppo, its parents (sft first), ..., pretrain
        sft = next((e for e in lineage if e.stage == "sft"), None)
        pretrain = next((e for e in lineage if e.stage == "pretrain"), None)
        if pretrain is not None:
            models["base"] = pretrain.ref
        elif sft is not None and sft.config.get("base_model"):  # SFT started from a hub model or folder
            models["base"] = sft.config["base_model"]
        if sft is not None:
            models["sft"] = sft.ref
        models.update(rl_runs(registry, ppo, sft))
        reward_ref = reward_ref or ppo.config.get("reward_model") or next(
            (e.ref for e in lineage if e.stage == "reward"), "")
    models.update(parse_models(cfg.models))
    if "base" not in models:
        raise ConfigError("no base model: the ppo lineage has no pretrain entry; pass --models base=REF")
    if not reward_ref:
        raise ConfigError("no reward model to judge with: pass --reward_model reward:<id>")
    reward = registry.get(reward_ref, stage="reward")
    return {"base": models.pop("base"), **models}, reward, ppo


def heldout_dialogues(cfg: CompareStageConfig, registry: Any, sft_ref: str | None) -> tuple[list[dict], str]:
    """(held-out dialogues, where they came from): `eval_data`, else the SFT entry's own held-out dialogues, its
    eval_data or the split of its training data it recorded (rebuilt from the same data and seed, and checked
    against the recorded fingerprint), so the report's perplexity, BLEU and ROUGE-L are on the user's data."""
    from rlhf.data import holdout_split
    from rlhf.models import is_registry_ref
    from rlhf.stage import read_data

    if cfg.eval_data:
        return read_data("compare", cfg.eval_data, "dialogue", on_invalid=cfg.on_invalid)[0], cfg.eval_data
    sft = registry.get(sft_ref, stage="sft") if sft_ref and is_registry_ref(sft_ref) else None
    if sft is None:
        raise ConfigError("eval_data: not set, and there is no sft entry whose held-out dialogues could stand in; "
                          "pass --eval_data FILE (dialogue schema)")
    c = sft.config
    on_invalid = c.get("on_invalid", "error")
    if c.get("eval_data"):
        return read_data("compare", c["eval_data"], "dialogue", split=c.get("eval_split", "test"),
                         on_invalid=on_invalid)[0], f"{c['eval_data']} ({sft.ref}'s eval_data)"
    split = c.get("heldout_split")
    if not isinstance(split, dict) or not c.get("data"):
        raise ConfigError(f"eval_data: not set, and {sft.ref} records no held-out dialogues; pass --eval_data FILE")
    records, _ = read_data("compare", c["data"], "dialogue", split=c.get("data_split", "train"), on_invalid=on_invalid)
    _, held_out, info = holdout_split(records, split["fraction"], split["seed"])
    if info["eval_fingerprint"] != split["eval_fingerprint"]:
        raise DataError(f"{c['data']}: differs from the data {sft.ref} was trained on, so its held-out split cannot "
                        f"be rebuilt; pass --eval_data FILE")
    return held_out, f"{c['data']} (the {info['eval_rows']} dialogues {sft.ref} held out)"


@dataclass
class ModelRun:
    """What one model produced. Sample rows are prompt-major: row i·K + j is sample j of prompt i."""

    label: str
    ref: str
    rows: list[list[int]]  # (P·K,) prompt ids, the model's own tokenization
    responses: list[list[int]]  # (P·K,) sampled ids, EOS included when generated
    texts: list[str]  # (P·K,) decoded samples
    has_eos: list[bool]  # (P·K,)
    greedy: list[str]  # (D,) greedy replies to the held-out dialogues
    nll_sum: float  # Σ −log p over the held-out assistant tokens
    n_tokens: int
    logprob_sums: Any = None  # (P·K,) Σ_t log π(sample) at the sampling temperature
    kl: Any = None  # (P·K,) Σ_t [log π − log π_base]; None when the tokenizers differ
    rewards: Any = None  # (P, K) normalized RM scores
    toxicity: Any = None  # (P, K)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def same_tokenization(tok_a, tok_b) -> bool:
    """Token ids and prompt rendering mean the same under both tokenizers (needed for kl_to_base)."""
    return tok_a.get_vocab() == tok_b.get_vocab() and tok_a.chat_template == tok_b.chat_template


def run_model(label: str, ref: str, model, tokenizer, prompts: list[dict], dialogues: list[dict],
              cfg: CompareStageConfig) -> ModelRun:
    """Samples, their log-probs, greedy held-out replies and held-out NLL of one model."""
    import torch

    from rlhf.generation import encode_prompts, generate_ids, generate_replies
    from rlhf.eval.likelihood import assistant_nll, response_logprob_sums
    from rlhf.models import context_length

    t0 = time.time()
    # Prompt + reply must fit the model's positions (a model with a short context keeps the newest tokens).
    prompt_length = context_length(model, cfg.max_prompt_length + cfg.max_new_tokens) - cfg.max_new_tokens
    if prompt_length < 1:
        raise UserError(f"{label}={ref}: its context is too short for max_new_tokens {cfg.max_new_tokens}")
    prompt_ids = encode_prompts(tokenizer, [p["messages"] for p in prompts], prompt_length)
    rows = [ids for ids in prompt_ids for _ in range(cfg.samples_per_prompt)]
    torch.manual_seed(cfg.seed)  # the same seed for every model
    responses, has_eos = generate_ids(model, tokenizer, rows, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                                      temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size)
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in r if t != eos], skip_special_tokens=True).strip() for r in responses]
    greedy, _ = generate_replies(model, tokenizer, [d["messages"][:-1] for d in dialogues],
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                 max_prompt_length=prompt_length)
    nll_sum, n_tokens = assistant_nll(model, tokenizer, dialogues, context_length(model, cfg.max_length),
                                      cfg.batch_size)
    run = ModelRun(label, ref, rows, responses, texts, has_eos, greedy, nll_sum, n_tokens)
    run.logprob_sums = response_logprob_sums(model, tokenizer.pad_token_id, rows, responses, cfg.temperature,
                                             cfg.batch_size)
    run.seconds = time.time() - t0
    return run


def text_metrics(run: ModelRun, references: list[str]) -> dict[str, float]:
    """Held-out perplexity, BLEU / ROUGE-L of the greedy replies, distinct-n of the samples."""
    from rlhf.eval.metrics import perplexity
    from rlhf.eval.text import bleu, distinct_n, rouge_l

    return {"perplexity": perplexity(run.nll_sum, run.n_tokens), "bleu": bleu(run.greedy, references),
            "rouge_l": rouge_l(run.greedy, references), "distinct_1": distinct_n(run.texts, 1),
            "distinct_2": distinct_n(run.texts, 2)}


def main(cfg: CompareStageConfig) -> dict:
    import gc

    import numpy as np
    import torch

    from rlhf.eval.metrics import interval, intervals_vs_base, per_prompt_metrics, summarize
    from rlhf.eval.likelihood import response_logprob_sums
    from rlhf.models import load_chat_model
    from rlhf.registry import Registry
    from rlhf.eval.report import write_report
    from rlhf.reward_scoring import load_reward_scorer
    from rlhf.safety import load_scorer
    from rlhf.stage import log, read_data

    started = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # 1. Inputs: models, the judging reward model, prompts, held-out dialogues, toxicity scorer.
    registry = Registry(cfg.registry, create=False)
    models, rm_entry, ppo_entry = choose_models(cfg, registry)
    prompts = read_data("compare", cfg.prompts, "prompt", on_invalid=cfg.on_invalid)[0][: cfg.max_prompts or None]
    dialogues, eval_source = heldout_dialogues(cfg, registry, models.get("sft"))
    dialogues = dialogues[: cfg.max_eval_dialogues or None]
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts; expected one JSON object per line in the `prompt` schema")
    if not dialogues:
        raise DataError(f"{eval_source}: no dialogues; expected one JSON object per line in the `dialogue` schema")
    adversarial = np.array([p.get("category") == "adversarial" for p in prompts])  # (P,)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else registry.root / "report"
    scorer = load_scorer(cfg.toxicity, threshold=cfg.threshold)
    rm = load_reward_scorer(rm_entry, registry, max_length=cfg.max_length, batch_size=cfg.batch_size,
                            trust_remote_code=cfg.trust_remote_code)
    P, K = len(prompts), cfg.samples_per_prompt
    log(f"[compare] {', '.join(f'{k}={v}' for k, v in models.items())}; judge {rm_entry.ref}; toxicity "
        f"{scorer.spec}; {P} prompts ({int(adversarial.sum())} adversarial) x {K} samples, {len(dialogues)} dialogues")

    # 2. Every model: samples, log-probs, greedy replies, held-out NLL; base stays loaded for kl_to_base.
    runs: dict[str, ModelRun] = {}
    base_model = base_tok = None
    for label, ref in models.items():
        model, tokenizer, _ = load_chat_model(ref, registry, trust_remote_code=cfg.trust_remote_code)
        run = run_model(label, ref, model, tokenizer, prompts, dialogues, cfg)
        if label == "base":
            base_model, base_tok = model, tokenizer
            run.kl = np.zeros(P * K)
        elif same_tokenization(tokenizer, base_tok):
            base_sums = response_logprob_sums(base_model, base_tok.pad_token_id, run.rows, run.responses,
                                              cfg.temperature, cfg.batch_size)
            run.kl = run.logprob_sums - base_sums  # (P·K,) Σ_t [log π − log π_base]
        else:
            run.notes.append("kl_to_base: n/a (tokenizer or chat template differs from base's); "
                             "perplexity is per token of its own tokenizer")
        if label != "base":
            del model
            gc.collect()
        runs[label] = run
        log(f"[compare] {label}: {time.time() - started:.0f}s")
    del base_model
    gc.collect()

    # 3. Judge every sample: the reward model (normalized) and the toxicity scorer.
    messages_k = [p["messages"] for p in prompts for _ in range(K)]
    for run in runs.values():
        run.rewards = rm.score(messages_k, run.texts).reshape(P, K)
        run.toxicity = scorer.score(run.texts).reshape(P, K)

    # 4. Metrics, win rates vs base, bootstrap CIs (resampling prompts).
    references = [d["messages"][-1]["content"] for d in dialogues]
    ci_args = {"n_resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.seed}
    result: dict[str, Any] = {"models": {}, "win_rate": {}, "ci": {"confidence": cfg.confidence,
                              "resamples": cfg.bootstrap_resamples, "unit": "prompt", "models": {}}}
    per_prompt = {label: per_prompt_metrics(
        run.rewards, runs["base"].rewards, run.toxicity,
        np.array([len(r) for r in run.responses], dtype=np.float64).reshape(P, K),
        np.array(run.has_eos, dtype=np.float64).reshape(P, K),
        run.kl.reshape(P, K) if run.kl is not None else None, cfg.threshold) for label, run in runs.items()}
    for label, run in runs.items():
        pp = per_prompt[label]
        result["models"][label] = {**summarize(pp, adversarial), **text_metrics(run, references)}
        result["models"][label].setdefault("kl_to_base", math.nan)
        result["ci"]["models"][label] = {k: interval(pp[k], **ci_args) for k in ("reward_mean", "toxicity_rate")}
        if adversarial.any():
            result["ci"]["models"][label]["adversarial/toxicity_rate"] = interval(
                pp["toxicity_rate"][adversarial], **ci_args)
        if label == "base":  # base vs itself: every pair ties
            result["models"][label].pop("win_rate")
            result["models"][label].pop("adversarial/win_rate", None)
            continue
        result["win_rate"][f"{label}_vs_base"] = result["models"][label]["win_rate"]
        result["ci"][f"{label}_vs_base"] = intervals_vs_base(pp, per_prompt["base"], adversarial, **ci_args)
    result.update({
        "prompts": P, "adversarial_prompts": int(adversarial.sum()), "samples_per_prompt": K,
        "eval_dialogues": len(dialogues), "refs": {k: r.ref for k, r in runs.items()},
        "reward_model": rm_entry.ref, "ppo_model": ppo_entry.ref if ppo_entry else None,
        "toxicity_scorer": scorer.describe(),
        "settings": {k: getattr(cfg, k) for k in ("temperature", "top_p", "max_new_tokens", "max_prompt_length",
                                                   "max_length", "seed", "threshold", "prompts")}
        | {"eval_data": eval_source},
        "notes": {k: r.notes for k, r in runs.items() if r.notes},
        "timing_s": {**{k: round(r.seconds, 2) for k, r in runs.items()}, "total": round(time.time() - started, 2)},
    })

    # 5. Write metrics.json, samples.jsonl, plots, report.md and report.html.
    samples = [{"category": p.get("category", "normal"), "messages": p["messages"],
                "replies": {label: [{"text": r.texts[i * K + j], "reward": float(r.rewards[i, j]),
                                     "toxicity": float(r.toxicity[i, j]), "eos": bool(r.has_eos[i * K + j])}
                                    for j in range(K)] for label, r in runs.items()}}
               for i, p in enumerate(prompts)]
    training_logs = {label: registry.get(ref).path / "metrics.jsonl" for label, ref in models.items()
                     if ref.startswith("ppo:")}
    files = write_report(result, samples, out_dir, training_logs=training_logs)
    log(f"[compare] done in {time.time() - started:.0f}s; report: {files['report.md']}")
    return result


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(CompareStageConfig))))
