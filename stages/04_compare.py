"""Stage 04: compare every aligned model of a lineage with SFT, base and each other on held-out prompts.

    python stages/04_compare.py --config configs/demo/compare.yaml
    python stages/04_compare.py --ppo_model ppo:<id> --models gpt2=gpt2 --prompts my_prompts.jsonl

Models (rlhf/eval/lineup.py): by default the `ppo` entry `ppo_model`, its `sft` entry, the `pretrain`
entry at the root (`base`), and every other aligned entry of that `sft` entry: `ppo` entries of any
estimator and `dpo` entries, labelled by stage, estimator and what distinguishes them (`ppo`,
`ppo-tox0` for a run without a toxicity term, `grpo`, `rloo`, `dpo`, ...; `-<id suffix>` when two share
one). `--models label=ref,...` adds models (registry refs, folders or hub ids) or replaces a default label.
Every model gets the same prompts, sampling settings and seed: K samples per prompt (sample j of prompt
i is paired across models), greedy replies to held-out dialogues, and a forward pass over those
dialogues. The held-out dialogues are `eval_data`, or the SFT entry's own: its eval_data, or the split
of its training data it recorded.

Measures (rlhf/eval/metrics.py; "per prompt, then the mean over prompts"):

    reward_mean            the reward model of the ppo lineage, normalized as in PPO
    toxicity_*             by the held-out judge `eval_toxicity` (rlhf/eval/toxicity.py; default: a scorer of
                           another family than the reward's): mean, rate (share of samples >= threshold), and
                           the RealToxicityPrompts expected_max_toxicity / toxicity_probability over K samples;
                           also on the adversarial prompts only (`adversarial/...`)
    reward_toxicity_*      mean and rate by the scorer the RL runs' reward used
    kl_to_base, kl_to_sft  mean over samples of Σ_t [log π − log π_ref] on the model's own samples
                           (both at the sampling temperature; needs the reference's tokenizer and template)
    perplexity             on the assistant tokens of the held-out dialogues
    bleu, rouge_l          greedy replies vs the held-out last assistant turns
    distinct_1/2, length_mean (tokens, EOS included), eos_rate    of the samples
    win_rate               RM-judged, vs base on the same prompt and sample index, ties half; `win_matrix`:
                           every model vs every other

Bootstrap CIs (resampling prompts, seeded) for the win rate, each model's reward and toxicity rates, each
difference vs base, and the differences table (rlhf/eval/differences.py): each pair that answers a
question (a run with the toxicity term vs one without, each aligned model vs sft, each model vs base).
The reward–KL frontier (rlhf/eval/frontier.py): each RL run's policy snapshots, sampled on the first
`frontier_prompts` prompts × `frontier_samples` samples: RM score, held-out toxicity rate, KL to sft
and to base; flags per run: stage 03's training_flags and "proxy reward up while the held-out judge
worsens" between checkpoints. Output in `output_dir` (default `<registry>/report/`): metrics.json,
samples.jsonl, report.md, report.html, plots (rlhf/eval/report.py lists them).
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
from rlhf.errors import ConfigError, DataError, RegistryError, run_cli  # noqa: E402
from rlhf.eval.lineup import Contender  # noqa: E402
from rlhf.eval.sampling import Judged, SamplingSettings  # noqa: E402

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
    toxicity: str = _help("The reward's toxicity scorer (reward_toxicity_*) when no RL entry records the one its "
                          "reward used; a spec of rlhf.safety: auto, profanity-check, better-profanity, "
                          "detoxify:NAME or path.", default="auto")
    eval_toxicity: str = _help("The held-out judge that grades toxicity (toxicity_*, the safety headline): a spec, or "
                               "auto = rlhf.safety.heldout_judge_spec(the reward's scorer), one of another family.",
                               default="auto")
    threshold: float = _help("A sample is toxic when its score is >= this.", default=0.5)
    bootstrap_resamples: int = _help("Bootstrap resamples (over prompts) for the confidence intervals.", default=1000)
    confidence: float = _help("Confidence level of the bootstrap intervals.", default=0.95)
    frontier_prompts: int = _help("The reward-KL frontier samples each policy snapshot on the first N prompts "
                                  "(0: all).", default=32)
    frontier_samples: int = _help("Samples per prompt for the frontier (capped at samples_per_prompt).", default=2)
    frontier_snapshots: int = _help("Policy snapshots per RL run on the frontier, evenly spread from the first to the "
                                    "last (0: no frontier).", default=10)
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
        if min(self.max_prompts, self.max_eval_dialogues, self.num_threads, self.frontier_prompts,
               self.frontier_snapshots) < 0:
            raise ConfigError("max_prompts, max_eval_dialogues, num_threads, frontier_prompts and frontier_snapshots "
                              "must be >= 0 (0: all / default / none)")
        check_positive(self, "frontier_samples")
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


def choose_models(cfg: CompareStageConfig, registry: Any) -> tuple[dict[str, Contender], Any, Any]:
    """({label: Contender} with base first, the reward entry, the ppo entry or None): the line-up of the ppo entry's
    SFT entry (rlhf.eval.lineup), then --models."""
    from rlhf.eval.lineup import aligned_runs, contenders

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
        models.update(aligned_runs(registry, ppo, sft))
        reward_ref = reward_ref or ppo.config.get("reward_model") or next(
            (e.ref for e in lineage if e.stage == "reward"), "")
    models.update(parse_models(cfg.models))
    if "base" not in models:
        raise ConfigError("no base model: the ppo lineage has no pretrain entry; pass --models base=REF")
    if not reward_ref:
        raise ConfigError("no reward model to judge with: pass --reward_model reward:<id>")
    reward = registry.get(reward_ref, stage="reward")
    return contenders({"base": models.pop("base"), **models}, registry), reward, ppo


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
class ModelRun(Judged):
    """What one compared model produced: its samples and their measures (rlhf.eval.sampling.Judged), greedy replies
    to the held-out dialogues and their negative log-likelihood."""

    label: str = ""
    ref: str = ""
    greedy: list[str] = field(default_factory=list)  # (D,) greedy replies to the held-out dialogues
    nll_sum: float = 0.0  # Σ −log p over the held-out assistant tokens
    n_tokens: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def sampling_settings(cfg: CompareStageConfig, samples_per_prompt: int) -> SamplingSettings:
    return SamplingSettings(samples_per_prompt, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_prompt_length,
                            cfg.seed, cfg.batch_size)


def run_model(label: str, ref: str, registry: Any, prompts: list[dict], dialogues: list[dict],
              settings: SamplingSettings, cfg: CompareStageConfig) -> ModelRun:
    """Load one model; its samples with their log-probs, greedy held-out replies and held-out NLL."""
    import gc

    from rlhf.eval.likelihood import assistant_nll
    from rlhf.eval.sampling import prompt_budget, sample
    from rlhf.generation import generate_replies
    from rlhf.models import context_length, load_chat_model

    t0 = time.time()
    model, tokenizer, _ = load_chat_model(ref, registry, trust_remote_code=cfg.trust_remote_code)
    samples = sample(model, tokenizer, prompts, settings, f"{label}={ref}")
    greedy, _ = generate_replies(model, tokenizer, [d["messages"][:-1] for d in dialogues],
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                 max_prompt_length=prompt_budget(model, settings, f"{label}={ref}"))
    nll_sum, n_tokens = assistant_nll(model, tokenizer, dialogues, context_length(model, cfg.max_length),
                                      cfg.batch_size)
    del model
    gc.collect()
    return ModelRun(samples, tokenizer, label=label, ref=ref, greedy=greedy, nll_sum=nll_sum, n_tokens=n_tokens,
                    seconds=time.time() - t0)


def text_metrics(run: ModelRun, references: list[str]) -> dict[str, float]:
    """Held-out perplexity, BLEU / ROUGE-L of the greedy replies, distinct-n of the samples."""
    from rlhf.eval.metrics import perplexity
    from rlhf.eval.text import bleu, distinct_n, rouge_l

    return {"perplexity": perplexity(run.nll_sum, run.n_tokens), "bleu": bleu(run.greedy, references),
            "rouge_l": rouge_l(run.greedy, references), "distinct_1": distinct_n(run.samples.texts, 1),
            "distinct_2": distinct_n(run.samples.texts, 2)}


def compare_metrics(runs: dict[str, ModelRun], adversarial: Any, references: list[str],
                    cfg: CompareStageConfig) -> tuple[dict[str, Any], dict[str, dict]]:
    """(result's `models`, `win_rate`, `win_matrix` and `ci`; {label: per-prompt metrics}): every model's metrics,
    its win rate and paired CIs vs base, and the RM-judged win rate of every model over every other."""
    import numpy as np

    from rlhf.eval.metrics import interval, intervals_vs_base, per_prompt_metrics, summarize, win_matrix

    P, K = len(adversarial), cfg.samples_per_prompt
    grid = (lambda a: None if a is None else np.asarray(a, dtype=np.float64).reshape(P, K))
    ci_args = {"n_resamples": cfg.bootstrap_resamples, "confidence": cfg.confidence, "seed": cfg.seed}
    result: dict[str, Any] = {"models": {}, "win_rate": {}, "win_matrix": win_matrix(
        {label: grid(r.rewards) for label, r in runs.items()}), "ci": {
        "confidence": cfg.confidence, "resamples": cfg.bootstrap_resamples, "unit": "prompt", "models": {}}}
    per_prompt = {label: per_prompt_metrics(
        grid(r.rewards), grid(runs["base"].rewards), grid(r.toxicity),
        grid([len(x) for x in r.samples.responses]), grid(r.samples.has_eos), grid(r.kl.get("base")), cfg.threshold,
        reward_toxicity=grid(r.reward_toxicity), kl_to_sft=grid(r.kl.get("sft"))) for label, r in runs.items()}
    for label, run in runs.items():
        pp = per_prompt[label]
        result["models"][label] = {**summarize(pp, adversarial), **text_metrics(run, references)}
        result["models"][label].setdefault("kl_to_base", math.nan)
        result["ci"]["models"][label] = {k: interval(pp[k], **ci_args)
                                         for k in ("reward_mean", "toxicity_rate", "reward_toxicity_rate")}
        if adversarial.any():
            result["ci"]["models"][label]["adversarial/toxicity_rate"] = interval(
                pp["toxicity_rate"][adversarial], **ci_args)
        if label == "base":  # base vs itself: every pair ties
            result["models"][label].pop("win_rate")
            result["models"][label].pop("adversarial/win_rate", None)
            continue
        result["win_rate"][f"{label}_vs_base"] = result["models"][label]["win_rate"]
        result["ci"][f"{label}_vs_base"] = intervals_vs_base(pp, per_prompt["base"], adversarial, **ci_args)
    return result, per_prompt


def kl_notes(runs: dict[str, ModelRun], has_sft: bool) -> dict[str, list[str]]:
    """Why a model has no kl_to_base / kl_to_sft."""
    for run in runs.values():
        if run.kl.get("base") is None:
            run.notes.append("kl_to_base: n/a (tokenizer or chat template differs from base's); "
                             "perplexity is per token of its own tokenizer")
        if has_sft and run.kl.get("sft") is None:
            run.notes.append("kl_to_sft: n/a (tokenizer or chat template differs from sft's)")
    return {k: r.notes for k, r in runs.items() if r.notes}


def run_flags(rl: dict[str, Contender], frontier: dict[str, list[dict]], n_samples: int,
              start: dict | None) -> tuple[dict, list[str]]:
    """({run label: flags}, notes): stage 03's training_flags of each RL run, then the frontier's over-optimization
    flags (rlhf.eval.frontier.overoptimization_flags: `n_samples` per point, the SFT model as step 0)."""
    from rlhf.eval.frontier import overoptimization_flags

    flags, notes = {}, []
    for label, c in rl.items():
        if "training_flags" not in c.entry.config:
            notes.append(f"{label}: its entry records no training_flags (trained before stage 03 logged them)")
        flags[label] = list(c.entry.config.get("training_flags", [])) + overoptimization_flags(
            frontier.get(label, []), n_samples, start)
    return flags, notes


def main(cfg: CompareStageConfig) -> dict:
    import numpy as np
    import torch

    from rlhf.eval.differences import paired_differences
    from rlhf.eval.frontier import judged_point, sample_snapshots
    from rlhf.eval.lineup import attribution_pairs
    from rlhf.eval.report import write_report
    from rlhf.eval.sampling import judge_samples, measure_kl
    from rlhf.eval.toxicity import load_scorers
    from rlhf.ppo.checkpoint import policy_snapshots
    from rlhf.registry import Registry
    from rlhf.reward_scoring import load_reward_scorer
    from rlhf.stage import log, read_data

    started = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # 1. Inputs: the line-up, the judging reward model, prompts, held-out dialogues, the two toxicity scorers.
    registry = Registry(cfg.registry, create=False)
    lineup, rm_entry, ppo_entry = choose_models(cfg, registry)
    rl = {label: c for label, c in lineup.items() if c.stage == "ppo"}
    sft_ref = lineup["sft"].ref if "sft" in lineup else None
    sft_entry = lineup["sft"].entry.ref if "sft" in lineup and lineup["sft"].entry else None
    prompts = read_data("compare", cfg.prompts, "prompt", on_invalid=cfg.on_invalid)[0][: cfg.max_prompts or None]
    dialogues, eval_source = heldout_dialogues(cfg, registry, sft_ref)
    dialogues = dialogues[: cfg.max_eval_dialogues or None]
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts; expected one JSON object per line in the `prompt` schema")
    if not dialogues:
        raise DataError(f"{eval_source}: no dialogues; expected one JSON object per line in the `dialogue` schema")
    adversarial = np.array([p.get("category") == "adversarial" for p in prompts])  # (P,)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else registry.root / "report"
    reward_scorer, judge, notes = load_scorers(cfg.toxicity, cfg.eval_toxicity,
                                               {k: c.entry.config for k, c in rl.items()}, cfg.threshold)
    rm = load_reward_scorer(rm_entry, registry, max_length=cfg.max_length, batch_size=cfg.batch_size,
                            trust_remote_code=cfg.trust_remote_code)
    P, K = len(prompts), cfg.samples_per_prompt
    FP, FK = min(cfg.frontier_prompts or P, P), min(cfg.frontier_samples, K)
    log(f"[compare] {', '.join(f'{k}={c.ref}' for k, c in lineup.items())}; judge {rm_entry.ref}; toxicity: reward's "
        f"{reward_scorer.spec}, held-out {judge.spec}; {P} prompts ({int(adversarial.sum())} adversarial) x {K} "
        f"samples, {len(dialogues)} dialogues")

    # 2. Every model: samples and their log-probs, greedy held-out replies, held-out NLL (one model at a time).
    runs: dict[str, ModelRun] = {}
    for label, c in lineup.items():
        runs[label] = run_model(label, c.ref, registry, prompts, dialogues, sampling_settings(cfg, K), cfg)
        log(f"[compare] {label}: {time.time() - started:.0f}s")

    # 3. The frontier's samples: the policy snapshots of every RL run of the sft entry, on FP prompts x FK samples.
    t0 = time.time()
    snapshots = {label: sample_snapshots(c.ref, registry, policy_snapshots(c.entry.path, cfg.frontier_snapshots),
                                         prompts[:FP], sampling_settings(cfg, FK), cfg.trust_remote_code)
                 for label, c in rl.items() if sft_entry and c.entry.config.get("sft_model") == sft_entry}
    notes += [f"{label}: no frontier (its SFT model is not the compared sft)" for label in rl if label not in snapshots]
    notes += [f"{label}: no policy snapshots in its entry, so no frontier" for label, s in snapshots.items()
              if not s and cfg.frontier_snapshots]
    frontier_s = time.time() - t0

    # 4. KL to base and to sft of every sample (each reference loaded once); the RM and both toxicity scorers.
    judged = [*runs.values(), *(s for ss in snapshots.values() for s in ss)]
    for name in ("base", "sft"):
        if name in lineup:
            measure_kl(name, lineup[name].ref, registry, judged, sampling_settings(cfg, K), own=runs[name],
                       trust_remote_code=cfg.trust_remote_code)
    judge_samples(judged, prompts, rm, reward_scorer, judge)

    # 5. Metrics, win rates (vs base, and every model vs every other), bootstrap CIs over prompts.
    result, per_prompt = compare_metrics(runs, adversarial, [d["messages"][-1]["content"] for d in dialogues], cfg)

    # 6. The frontier's points, the paired differences that answer a question, and each RL run's flags.
    result["frontier"] = {label: [judged_point(s, cfg.threshold, s.step) for s in snapshots.get(label, [])]
                          for label in rl}
    result["frontier_references"] = {label: judged_point(r.subset(K, FP, FK), cfg.threshold)
                                     for label, r in runs.items() if label not in rl}
    result["differences"] = paired_differences(
        per_prompt, attribution_pairs(lineup), adversarial=adversarial, n_resamples=cfg.bootstrap_resamples,
        confidence=cfg.confidence, seed=cfg.seed)
    result["flags"], flag_notes = run_flags(rl, result["frontier"], FP * FK, result["frontier_references"].get("sft"))
    result.update({
        "prompts": P, "adversarial_prompts": int(adversarial.sum()), "samples_per_prompt": K,
        "eval_dialogues": len(dialogues), "refs": {k: r.ref for k, r in runs.items()},
        "reward_model": rm_entry.ref, "ppo_model": ppo_entry.ref if ppo_entry else None,
        "toxicity_scorer": judge.describe(), "reward_toxicity_scorer": reward_scorer.describe(),
        "scorers": {"reward": reward_scorer.spec, "eval": judge.spec},
        "frontier_settings": {"prompts": FP, "samples_per_prompt": FK, "max_snapshots": cfg.frontier_snapshots},
        "settings": {k: getattr(cfg, k) for k in ("temperature", "top_p", "max_new_tokens", "max_prompt_length",
                                                   "max_length", "seed", "threshold", "prompts")}
        | {"eval_data": eval_source},
        "notes": kl_notes(runs, "sft" in lineup), "remarks": notes + flag_notes,
        "timing_s": {**{k: round(r.seconds, 2) for k, r in runs.items()}, "frontier_sampling": round(frontier_s, 2),
                     "total": round(time.time() - started, 2)},
    })

    # 7. Write metrics.json, samples.jsonl, plots, report.md and report.html.
    samples = [{"category": p.get("category", "normal"), "messages": p["messages"],
                "replies": {label: [{"text": r.samples.texts[i * K + j], "reward": float(r.rewards[i * K + j]),
                                     "toxicity": float(r.toxicity[i * K + j]),
                                     "reward_toxicity": float(r.reward_toxicity[i * K + j]),
                                     "eos": bool(r.samples.has_eos[i * K + j])}
                                    for j in range(K)] for label, r in runs.items()}}
               for i, p in enumerate(prompts)]
    training_logs = {label: c.entry.path / "metrics.jsonl" for label, c in rl.items()}
    files = write_report(result, samples, out_dir, training_logs=training_logs)
    log(f"[compare] done in {time.time() - started:.0f}s; report: {files['report.md']}")
    return result


if __name__ == "__main__":
    from rlhf import console  # quiet console (--verbose: all), before the heavy imports of main

    run_cli(lambda: main(console.setup(parse_config(CompareStageConfig))))
