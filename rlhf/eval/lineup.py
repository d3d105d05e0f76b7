"""Who stage 04 compares, under which labels, and which pairs of them answer a question.

The line-up by default: `base` (the lineage's pretrain entry, or the SFT entry's base model), `sft`, then every
aligned entry trained from that SFT entry: the chosen `ppo` entry first, the other `ppo` entries (any advantage
estimator) oldest first, then the `dpo` entries oldest first. Labels (`run_label`):

    ppo        a `ppo` entry of estimator gae (PPO with its critic)
    grpo, rloo, dr_grpo, reinforce_pp, ...    a `ppo` entry of that critic-free estimator
    <name>-tox0    one of these without a toxicity term in its reward (toxicity_coef 0 and no budget, toxicity
                   left out of reward_funcs, or its reward weight 0)
    dpo        a `dpo` entry

A label already taken gets the entry id's last 6 characters (`ppo-8fcd95`).

Pairs that answer a question (`attribution_pairs`), each `a` − `b`:

    what the toxicity term bought    a run with the term vs the first run of the same estimator without it
    what the RL / DPO step bought    each aligned model (`ppo` or `dpo` entry) vs `sft`
    what the pipeline bought         every model vs `base`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf.registry import Entry

TOX0 = "-tox0"
ALIGNED_STAGES = ("ppo", "dpo")
QUESTIONS = {"toxicity_term": "what the toxicity term bought", "aligned_vs_sft": "what the RL / DPO step bought",
             "vs_base": "what the pipeline bought"}


@dataclass(frozen=True)
class Contender:
    """One compared model. `entry` is its registry entry (None for a folder or hub id)."""

    label: str
    ref: str
    entry: Entry | None = None

    @property
    def stage(self) -> str | None:
        return self.entry.stage if self.entry is not None else None

    @property
    def estimator(self) -> str | None:
        """A `ppo` entry's advantage estimator (`gae` for entries from before there were others)."""
        return self.entry.config.get("advantage_estimator", "gae") if self.stage == "ppo" else None

    @property
    def toxicity_term(self) -> bool | None:
        """Whether a `ppo` entry's reward had a toxicity term (None for other models)."""
        return has_toxicity_term(self.entry.config) if self.stage == "ppo" else None


def has_toxicity_term(config: dict[str, Any]) -> bool:
    """Whether a stage-03 config's reward subtracts toxicity: `toxicity` among reward_funcs (default rm, toxicity)
    with a non-zero weight, and a non-zero toxicity_coef or a toxicity_budget (whose multiplier can grow from 0).

    >>> has_toxicity_term({"toxicity_coef": 5.0}), has_toxicity_term({"toxicity_coef": 0.0})
    (True, False)
    >>> has_toxicity_term({"reward_funcs": ["rm"]}), has_toxicity_term({"toxicity_coef": 0, "toxicity_budget": 0.1})
    (False, True)
    """
    funcs = list(config.get("reward_funcs") or ["rm", "toxicity"])
    if "toxicity" not in funcs:
        return False
    weights = config.get("reward_weights")
    if weights and weights[funcs.index("toxicity")] == 0:
        return False
    return config.get("toxicity_coef", 1.0) != 0 or config.get("toxicity_budget") is not None


def run_label(entry: Entry) -> str:
    """An aligned entry's label before collisions (module docstring)."""
    if entry.stage == "dpo":
        return "dpo"
    estimator = entry.config.get("advantage_estimator", "gae")
    name = "ppo" if estimator == "gae" else estimator
    return name if has_toxicity_term(entry.config) else name + TOX0


def aligned_runs(registry: Any, chosen: Entry, sft: Entry | None) -> dict[str, str]:
    """{label: ref} of the aligned entries of `sft` in line-up order (module docstring), `chosen` first."""
    runs = {run_label(chosen): chosen.ref}
    if sft is None:
        return runs
    for stage in ALIGNED_STAGES:
        for e in registry.entries(stage):
            if sft.ref in e.parents and e.ref != chosen.ref:
                label = run_label(e)
                runs[label if label not in runs else f"{label}-{e.id[-6:]}"] = e.ref
    return runs


def contenders(models: dict[str, str], registry: Any) -> dict[str, Contender]:
    """{label: Contender} of {label: ref}; registry refs carry their entry (read without re-checking files:
    loading the model checks them)."""
    from rlhf.models import is_registry_ref

    return {label: Contender(label, ref, registry.get(ref, verify=False) if is_registry_ref(ref) else None)
            for label, ref in models.items()}


def attribution_pairs(lineup: dict[str, Contender]) -> list[tuple[str, str, str]]:
    """(a, b, question) of the pairs that answer a question (module docstring), in line-up order."""
    pairs = []
    runs = [c for c in lineup.values() if c.stage == "ppo"]
    for c in runs:
        if c.toxicity_term is False:
            partner = next((r for r in runs if r.estimator == c.estimator and r.toxicity_term), None)
            if partner is not None:
                pairs.append((partner.label, c.label, QUESTIONS["toxicity_term"]))
    if "sft" in lineup:
        pairs += [(c.label, "sft", QUESTIONS["aligned_vs_sft"]) for c in lineup.values() if c.stage in ALIGNED_STAGES]
    if "base" in lineup:
        pairs += [(label, "base", QUESTIONS["vs_base"]) for label in lineup if label != "base"]
    return pairs
