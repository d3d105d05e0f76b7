"""One run of each implementation as a child process, at the settings both get, and its record.

Ours runs `stages/03_ppo.py` with this interpreter and reads the registered entry's metrics.jsonl; TRL runs
`scripts/bench_trl_peer.py` in the peer's virtualenv and reads the OUT file it writes. Both records hold
the same per-step series (`step_s`, `score`, `kl`) and totals (`loop_s`, `episodes`), for `bench.stats`.
`run_stage` and `run_peer` (one child of each side, its record and its raw output) also serve `bench.critic_free`.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import baseline, child_env, last_error_line, run_child
from .setups import Setup

# What every run of ours imports before its first step: its import-only baseline (scripts/bench_trl_peer.py
# --imports-only is TRL's).
OURS_IMPORTS = ("import torch, transformers, peft, accelerate, bitsandbytes, tqdm; "
                "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification; "
                "import rlhf.ppo.actor_critic, rlhf.ppo.losses, rlhf.data, rlhf.registry, rlhf.generation; "
                "from rlhf.safety import load_scorer; load_scorer('profanity-check')")


@dataclass
class Settings:
    """Hyperparameters both implementations get (option names as in TRL 1.12's PPOConfig)."""

    total_episodes: int = 128
    batch_size: int = 16  # prompts per PPO step: ours 8 x 2 minibatches, TRL per_device 16 / 2 minibatches
    num_mini_batches: int = 2
    num_ppo_epochs: int = 2
    response_length: int = 32
    learning_rate: float = 3e-4
    kl_coef: float = 0.05
    temperature: float = 1.0
    missing_eos_penalty: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    weight_decay: float = 0.01  # torch AdamW's default, which ours uses
    adam_epsilon: float = 1e-5  # ours
    local_rollout_forward_batch_size: int = 32  # TRL's rollout chunks (it also generates in chunks of this size)
    # Ours only: rows per update micro-batch and per rollout forward. The minibatch, and so every optimizer step,
    # is the same (our micro-batches are token-weighted: tests/test_ppo_stage.py); with group_by_length the rows
    # are cut into chunks by length. TRL 1.12 cannot split its minibatches this way (docs/BENCHMARKS.md).
    ours_micro_batch: int = 2
    ours_rollout_chunk: int = 4
    ours_fuse_roles: bool = True  # pays at these small chunks (docs/BENCHMARKS.md)


def baselines(peer_py: Path | None, threads: int, work: Path) -> dict[str, dict[str, Any]]:
    """The import-only child of each side (TRL's only with a peer interpreter): what "above baseline" subtracts."""
    out = {"ours": baseline(sys.executable, ["-c", OURS_IMPORTS], "ours", threads, work)}
    if peer_py is not None:
        out["trl"] = baseline(str(peer_py), ["scripts/bench_trl_peer.py", "--imports-only"], "trl", threads, work)
    return out


def ours_cmd(s: Settings, setup: Setup, *, sft: str, reward: str, four_bit: bool, seed: int) -> list[str]:
    """The options of stages/03_ppo.py for these settings."""
    mini = s.batch_size // s.num_mini_batches
    micro = min(s.ours_micro_batch, mini)
    if mini % micro:
        raise ValueError(f"ours_micro_batch {micro} does not divide the minibatch of {mini} rows")
    opts = {
        "registry": setup.registry, "data": setup.prompts, "sft_model": sft, "reward_model": reward,
        "load_in_4bit": str(four_bit).lower(), "seed": seed, "total_episodes": s.total_episodes,
        "per_device_train_batch_size": micro, "gradient_accumulation_steps": mini // micro,
        "num_mini_batches": s.num_mini_batches, "num_ppo_epochs": s.num_ppo_epochs,
        "response_length": s.response_length, "learning_rate": s.learning_rate, "kl_coef": s.kl_coef,
        "kl_estimator": "k1", "temperature": s.temperature, "missing_eos_penalty": s.missing_eos_penalty,
        "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
        "local_rollout_forward_batch_size": s.ours_rollout_chunk, "group_by_length": "true",
        "fuse_roles": str(s.ours_fuse_roles).lower(),
        "max_grad_norm": 1e9,  # TRL's PPO loop does not clip gradients
        "toxicity": "profanity-check", "toxicity_coef": 0, "save_steps": 10**6, "sample_steps": 10**6,
        "logging_steps": 10**6,
    }
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))]


def ours_steps(rows: list[dict[str, Any]], missing_eos_penalty: float) -> dict[str, list[float]]:
    """Per-step series from our metrics.jsonl rows. `score` includes the EOS penalty, as TRL's
    `objective/scores` does: score − penalty · (1 − eos_rate)."""
    return {
        "step_s": [r["timing/rollout_s"] + r["timing/update_s"] for r in rows],
        "rollout_s": [r["timing/rollout_s"] for r in rows],
        "update_s": [r["timing/update_s"] for r in rows],
        "score": [r["objective/score"] - missing_eos_penalty * (1 - r["response/eos_rate"]) for r in rows],
        "kl": [r["objective/kl"] for r in rows],
        "response_length": [r["response/length_mean"] for r in rows],
    }


def run_stage(args: list[str], setup: Setup, *, label: str, seed: int, threads: int, work: Path,
              profile: Path | None = None, env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """One run of stages/03_ppo.py with `args` (under cProfile when `profile` names the output file): its record,
    without the per-step series, and the metrics.jsonl rows of the entry it registered (none when it failed)."""
    from rlhf.registry import Registry

    registry = Registry(setup.registry)
    before = {e.ref for e in registry.entries("ppo")}
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    res = run_child([sys.executable, *prof, "stages/03_ppo.py", *args], {**child_env(threads), **(env or {})}, 3600,
                    work / "logs" / f"{label}-ours-s{seed}.log")
    record = {"impl": "ours", "label": label, "seed": seed, "ok": res["rc"] == 0, "error": None, **res}
    new = [e for e in registry.entries("ppo") if e.ref not in before]
    if res["rc"] or not new:
        record.update(ok=False, error=last_error_line(res["log_tail"]) if res["rc"] else "no ppo entry registered")
        return record, []
    entry = new[-1]
    record.update(ref=entry.ref, model_memory_mb=entry.metrics.get("model_memory_mb"))
    return record, [json.loads(x) for x in (entry.path / "metrics.jsonl").read_text().splitlines()]


def run_ours(s: Settings, setup: Setup, *, label: str, sft: str, reward: str, four_bit: bool, seed: int,
             threads: int, work: Path, profile: Path | None = None,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run of stages/03_ppo.py at these settings (under cProfile when `profile` names the output file)."""
    record, rows = run_stage(ours_cmd(s, setup, sft=sft, reward=reward, four_bit=four_bit, seed=seed), setup,
                             label=label, seed=seed, threads=threads, work=work, profile=profile, env=env)
    if rows:
        series = ours_steps(rows, s.missing_eos_penalty)
        record.update(series, loop_s=sum(series["step_s"]), episodes=rows[-1]["episodes"])
    return record


def trl_spec(s: Settings, prompt_ids: list[list[int]], *, sft_path: str, rm_path: str, policy_4bit: bool,
             value: str, reward_4bit: bool, seed: int) -> dict[str, Any]:
    """The peer's SPEC (scripts/bench_trl_peer.py): the same settings in PPOConfig's names."""
    return {
        "sft_path": sft_path, "rm_path": rm_path, "prompt_ids": prompt_ids, "policy_4bit": policy_4bit,
        "value": value, "reward_4bit": reward_4bit, "seed": seed, "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
        "total_episodes": s.total_episodes, "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": 1, "num_mini_batches": s.num_mini_batches, "num_ppo_epochs": s.num_ppo_epochs,
        "local_rollout_forward_batch_size": s.local_rollout_forward_batch_size,
        "response_length": s.response_length, "temperature": s.temperature, "learning_rate": s.learning_rate,
        "kl_coef": s.kl_coef, "kl_estimator": "k1", "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
        "gamma": 1.0, "lam": 0.95, "missing_eos_penalty": s.missing_eos_penalty, "whiten_rewards": False,
        "weight_decay": s.weight_decay, "adam_epsilon": s.adam_epsilon,
    }


def trl_steps(result: dict[str, Any]) -> dict[str, list[float]]:
    """Per-step series from the peer's result: step times from the step-end clock, scores and KL from its logs."""
    ends = result.get("step_end_s") or []
    logs = [r for r in result.get("logs", []) if "objective/scores" in r]
    return {
        "step_s": [b - a for a, b in zip([0.0, *ends[:-1]], ends)],
        "score": [r["objective/scores"] for r in logs],
        "kl": [r["objective/kl"] for r in logs],
    }


def run_peer(py: Path | str, script: str, spec: dict[str, Any], *, label: str, seed: int, threads: int, work: Path,
             env: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of a TRL peer script (`py script SPEC OUT`): its record (impl "trl"), without the per-step
    series, and the OUT object it wrote (empty when it failed)."""
    folder = work / "trl" / f"{label}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    res = run_child([str(py), script, str(folder / "spec.json"), str(folder / "out.json")],
                    {**child_env(threads), **(env or {})}, 3600, work / "logs" / f"{label}-trl-s{seed}.log")
    record = {"impl": "trl", "label": label, "seed": seed, "ok": res["rc"] == 0, "error": None, **res}
    out = json.loads((folder / "out.json").read_text()) if (folder / "out.json").exists() else {}
    shutil.rmtree(folder / "trl_output", ignore_errors=True)  # TRL's output_dir: nothing the report reads
    if res["rc"] or not out.get("ok"):
        record.update(ok=False, error=out.get("error") or last_error_line(res["log_tail"]))
        return record, {}
    return record, out


def run_trl(s: Settings, peer_py: Path, prompt_ids: list[list[int]], *, label: str, sft_path: str, rm_path: str,
            policy_4bit: bool, value: str, reward_4bit: bool, seed: int, threads: int, work: Path,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """One run of TRL 1.12's PPOTrainer through scripts/bench_trl_peer.py in the peer's virtualenv."""
    spec = trl_spec(s, prompt_ids, sft_path=sft_path, rm_path=rm_path, policy_4bit=policy_4bit, value=value,
                    reward_4bit=reward_4bit, seed=seed)
    record, out = run_peer(peer_py, "scripts/bench_trl_peer.py", spec, label=label, seed=seed, threads=threads,
                           work=work, env=env)
    if out:
        record.update(trl_steps(out), loop_s=out["loop_s"], episodes=out["episodes"],
                      model_memory_mb=out["model_memory_mb"], trainable_params=out["trainable_params"])
    return record
