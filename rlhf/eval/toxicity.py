"""The comparison's two toxicity scorers: the one the RL runs' reward used, and the held-out judge.

A policy trained against a toxicity scorer can learn to lower that scorer's number without becoming less
toxic, so stage 04 grades toxicity (`toxicity_*`, the safety headline) with a held-out judge and reports the
reward's own scorer beside it (`reward_toxicity_*`):

    reward's scorer   the spec the RL entries recorded (config["toxicity_scorer"]["spec"], resolved: never
                      `auto`); the first run's when they differ (a note says so); with no RL entry recording
                      one, the stage's own `toxicity` spec
    held-out judge    `eval_toxicity`; `auto`: `rlhf.safety.heldout_judge_spec(reward's spec)`, a scorer of
                      another family. A detoxify judge loads as `auto:<name>`, so where its checkpoint is
                      neither on disk nor downloadable it becomes profanity-check, which is of another family
                      than any detoxify reward too. A named spec is used as is, even the reward's own.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"


def reward_scorer_spec(rl_configs: dict[str, dict[str, Any]], fallback: str) -> tuple[str, list[str]]:
    """(spec, notes): the toxicity scorer of the RL runs' reward ({label: entry config}), else `fallback`.

    >>> reward_scorer_spec({"ppo": {"toxicity_scorer": {"spec": "profanity-check"}}}, "auto")
    ('profanity-check', [])
    >>> reward_scorer_spec({"dpo": {}}, "auto")
    ('auto', [])
    """
    specs = {label: c["toxicity_scorer"]["spec"] for label, c in rl_configs.items()
             if isinstance(c.get("toxicity_scorer"), dict) and c["toxicity_scorer"].get("spec")}
    if not specs:
        return fallback, []
    first_label, first = next(iter(specs.items()))
    others = {label: s for label, s in specs.items() if s != first}
    listed = ", ".join(f"{k}: {v}" for k, v in specs.items())
    notes = [f"the RL runs' rewards used different toxicity scorers ({listed}); reward_toxicity_* uses "
             f"{first_label}'s"] if others else []
    return first, notes


def judge_spec(eval_toxicity: str, reward_spec: str) -> str:
    """The spec to load for the held-out judge (module docstring); `reward_spec` is resolved.

    >>> judge_spec("auto", "profanity-check"), judge_spec("auto", "detoxify:original")
    ('better-profanity', 'auto:unbiased')
    >>> judge_spec("profanity-check", "profanity-check")
    'profanity-check'
    """
    from rlhf.safety import DETOXIFY_MODELS, heldout_judge_spec

    if eval_toxicity != AUTO:
        return eval_toxicity
    judge = heldout_judge_spec(reward_spec)
    backend, _, name = judge.partition(":")
    return f"auto:{name}" if backend == "detoxify" and name in DETOXIFY_MODELS else judge


def load_scorers(toxicity: str, eval_toxicity: str, rl_configs: dict[str, dict[str, Any]],
                 threshold: float) -> tuple[Any, Any, list[str]]:
    """(reward's scorer, held-out judge, notes): both `rlhf.safety.ToxicityScorer`s, the same object when they
    resolve to the same spec."""
    from rlhf.safety import load_scorer

    spec, notes = reward_scorer_spec(rl_configs, toxicity)
    reward = load_scorer(spec, threshold=threshold)
    wanted = judge_spec(eval_toxicity, reward.spec)
    judge = reward if wanted == reward.spec else load_scorer(wanted, threshold=threshold)
    if judge.spec == reward.spec:
        notes.append(f"the held-out judge is the reward's own scorer ({judge.spec}): the toxicity figures are not "
                     "independent of what the RL runs optimized")
    return reward, judge, notes
