"""Paired differences between compared models, with bootstrap CIs: what each step of the pipeline bought.

Every model was sampled on the same prompts with the same seed, K samples each, so sample j of prompt i of
model a and of model b are a pair. A per-prompt metric is the mean over those K samples, hence

    per_prompt_a[m] − per_prompt_b[m]   (P,)   the mean over the K paired samples of each prompt's difference

and the difference's CI is the percentile bootstrap over prompts of these paired values
(`rlhf.eval.metrics.interval`): prompts are the unit that was drawn, and resampling the pairs together keeps
what the two models share (a hard prompt is hard for both) out of the interval. A metric named
`adversarial/<m>` is <m> on the adversarial prompts only.

Rows: {"a", "b", "question", "metric", "delta", "ci_low", "ci_high"}, delta = a − b (the pairs and their
questions: `rlhf.eval.lineup.attribution_pairs`).

Import cost: numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf.eval.metrics import interval

# The metrics of the differences table: the proxy the runs optimized, toxicity by the held-out judge (all and
# adversarial prompts) and by the reward's own scorer.
DIFFERENCE_METRICS = ("reward_mean", "toxicity_rate", "adversarial/toxicity_rate", "reward_toxicity_rate")


def paired_differences(per_prompt: dict[str, dict[str, np.ndarray]], pairs: list[tuple[str, str, str]],
                       metrics: tuple[str, ...] = DIFFERENCE_METRICS, adversarial: np.ndarray | None = None, *,
                       n_resamples: int, confidence: float, seed: int) -> list[dict[str, Any]]:
    """One row per (pair, metric) (module docstring); metrics a model lacks, and `adversarial/` ones without
    adversarial prompts, are left out.

    per_prompt   {label: {metric: (P,) per-prompt values}}, the same P prompts in the same order for every label
    pairs        (a, b, question)
    adversarial  (P,) bool, or None
    """
    rows = []
    for a, b, question in pairs:
        for metric in metrics:
            name, select = metric, None
            if metric.startswith("adversarial/"):
                name, select = metric.split("/", 1)[1], adversarial
                if select is None or not np.any(select):
                    continue
            if name not in per_prompt[a] or name not in per_prompt[b]:
                continue
            diff = np.asarray(per_prompt[a][name], dtype=np.float64) - np.asarray(per_prompt[b][name], dtype=np.float64)
            ci = interval(diff if select is None else diff[select], n_resamples=n_resamples, confidence=confidence,
                          seed=seed)
            rows.append({"a": a, "b": b, "question": question, "metric": metric, "delta": ci["value"],
                         "ci_low": ci["low"], "ci_high": ci["high"]})
    return rows
