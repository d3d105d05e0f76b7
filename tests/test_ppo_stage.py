"""Stage 03 (PPO): invariances of the update, the real CLI end to end, resume, two processes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script
from rlhf.registry import Registry

WORKER = str(ROOT / "tests" / "workers" / "ppo_ddp_update.py")
TINY_PPO = ["--total_episodes", "16", "--per_device_train_batch_size", "4", "--num_mini_batches", "2",
            "--num_ppo_epochs", "1", "--response_length", "8", "--max_prompt_length", "32",
            "--toxicity", "profanity-check", "--learning_rate", "5e-3", "--lora_r", "4", "--save_steps", "1"]


def _model_dir(registry: Path) -> str:
    return str(Registry(registry).get("sft:latest").path)


def _assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def _assert_same_update(a: dict, b: dict) -> None:
    """Two updates written by the worker (the change of each trainable tensor) agree up to float rounding:
    1e-5 of the largest change. A wrongly weighted micro-batch or process moves them by far more."""
    assert a.keys() == b.keys()
    largest = max(v.abs().max().item() for v in a.values())
    assert largest > 0, "the update changed nothing"
    _assert_same_tensors(a, b, atol=1e-5 * largest)


def _rollout(ac, tok, prompts: list[list[int]], cfg: dict):
    """One rollout on the device of `ac`'s model with the tokenizer's pad and EOS (cfg: temperature,
    response_length, forward_batch_size, group_by_length)."""
    from rlhf.ppo.rollout import rollout

    return rollout(ac, prompts, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   device=next(ac.model.parameters()).device, **cfg)


def _assert_same_rollout(a, b) -> None:
    """Two rollouts of the same seed: same responses, and per real token the same reference logprobs and
    values, per row the same RM score, up to float rounding."""
    assert torch.equal(a.responses, b.responses)
    mask = a.mask.bool()
    for key in ("ref_logprobs", "values"):
        torch.testing.assert_close(getattr(a, key)[mask], getattr(b, key)[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.rm_scores, b.rm_scores, atol=1e-5, rtol=1e-5)


# The update's modes the invariances hold for: PPO with its critic, and no critic with each loss aggregation
# and KL placement (tests/workers/ppo_ddp_update.py).
UPDATE_MODES = ["gae", "grpo", "reinforce_pp"]


@pytest.mark.parametrize("mode", UPDATE_MODES)
def test_gradient_accumulation_invariance_1x8_equals_8x1(rlhf_registry, tmp_path, mode):
    """Splitting a minibatch into micro-batches must not change the update (losses weighted by their share)."""
    model = _model_dir(rlhf_registry)
    for micro in (8, 1):
        res = run_script(WORKER, model, str(tmp_path / f"m{micro}.safetensors"), str(micro), "1", "1", mode)
        assert res.returncode == 0, res.stderr[-2000:]
    one, eight = load_file(str(tmp_path / "m8.safetensors")), load_file(str(tmp_path / "m1.safetensors"))
    _assert_same_update(one, eight)


@pytest.mark.parametrize("mode", ["gae", "grpo"])  # the other modes only differ before the update
def test_micro_batches_of_rows_grouped_by_length_give_the_same_update(rlhf_registry, tmp_path, mode):
    """group_by_length regroups a minibatch's rows (shortest first) before cutting micro-batches; the update must
    be the one of micro-batches in row order."""
    model = _model_dir(rlhf_registry)
    for group in ("1", "0"):
        res = run_script(WORKER, model, str(tmp_path / f"g{group}.safetensors"), "2", group, "1", mode)
        assert res.returncode == 0, res.stderr[-2000:]
    _assert_same_update(load_file(str(tmp_path / "g1.safetensors")), load_file(str(tmp_path / "g0.safetensors")))


@pytest.mark.parametrize("mode", UPDATE_MODES)
def test_two_processes_match_one_process_on_the_same_global_batch(rlhf_registry, tmp_path, mode):
    """Data parallelism (gloo, 2 CPU processes) gives the update of one process on the whole batch, advantages of
    global statistics (REINFORCE++'s whitening) included."""
    model = _model_dir(rlhf_registry)
    res = run_script(WORKER, model, str(tmp_path / "one.safetensors"), "-", "1", "1", mode)
    assert res.returncode == 0, res.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(29533 + UPDATE_MODES.index(mode))]
    res = subprocess.run([*torchrun, WORKER, model, str(tmp_path / "two.safetensors"), "-", "1", "1", mode],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_update(load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors")))


@pytest.mark.parametrize("load_in_4bit,temperature", [(False, 1.0), (True, 0.7)])
def test_rollout_logprobs_from_generation_equal_a_fresh_policy_forward(rlhf_registry, tiny_data, device,
                                                                       load_in_4bit, temperature):
    """The rollout takes the policy's logprobs from `generate`'s logits instead of a second forward; they must be
    what the update's forward computes on the same rows (so the first PPO ratio is 1), at any temperature."""
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.data import load_records
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer
    from rlhf.ppo.losses import logprobs_from_logits

    model = _model_dir(rlhf_registry)
    reward = Registry(rlhf_registry).get("reward:latest").path  # an adapter + head on this SFT model
    tok = load_tokenizer(model)
    ac = build_actor_critic(model, tok, load_in_4bit=load_in_4bit, lora_r=4, lora_alpha=8,
                            lora_target_modules="all-linear", reward_dir=reward, separate_reward=None,
                            device=device)
    with torch.no_grad():  # a policy adapter that differs from the reference
        for name, p in ac.model.named_parameters():
            if ".policy." in name:
                p.add_(0.05 * torch.randn_like(p))
    prompts = [r["messages"] for r in load_records(str(tiny_data["prompts"]), "prompt")[:6]]
    cfg = dict(temperature=temperature, response_length=12, forward_batch_size=4, group_by_length=True)
    torch.manual_seed(0)
    batch = _rollout(ac, tok, encode_prompts(tok, prompts, 32), cfg)
    resp, mask = batch.responses, batch.mask.bool()
    with torch.no_grad():
        logits = ac.policy_logits(batch.query_responses, batch.attention_mask, resp.shape[1]) / temperature
        fresh = logprobs_from_logits(logits, resp)
    assert batch.logprobs.shape == resp.shape == mask.shape
    torch.testing.assert_close(batch.logprobs[mask], fresh[mask], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batch.logprobs[mask], batch.ref_logprobs[mask], atol=1e-3)


def test_generation_on_weights_dequantized_once_samples_what_4bit_generation_samples(rlhf_registry, tiny_data,
                                                                                   monkeypatch):
    """dequantize_for_generation: the 4-bit layers compute with weights dequantized once per rollout instead of
    bitsandbytes' 4-bit matmul at every token; the same seed must sample the same tokens with the same logprobs,
    and the layers must be 4-bit again afterwards."""
    import bitsandbytes as bnb

    from rlhf.data import load_records
    from rlhf.generation import encode_prompts

    ac, tok = _actor_critic_with_distinct_adapters(rlhf_registry, load_in_4bit=True)
    prompts = encode_prompts(tok, [r["messages"] for r in load_records(str(tiny_data["prompts"]), "prompt")[:6]], 32)
    cfg = dict(temperature=1.0, response_length=12, forward_batch_size=4, group_by_length=True)
    calls = {"n": 0}
    matmul_4bit = bnb.matmul_4bit

    def counted(*args, **kwargs):
        calls["n"] += 1
        return matmul_4bit(*args, **kwargs)

    generate, in_generation = ac.model.generate, []

    def tracked(**kwargs):
        before = calls["n"]
        out = generate(**kwargs)
        in_generation.append(calls["n"] - before)
        return out

    monkeypatch.setattr(bnb, "matmul_4bit", counted)
    monkeypatch.setattr(ac.model, "generate", tracked)
    batches, in_rollout = [], []
    for dense in (False, True):
        ac.dequantize_for_generation = dense
        before = calls["n"]
        torch.manual_seed(0)
        batches.append(_rollout(ac, tok, prompts, cfg))
        in_rollout.append(calls["n"] - before)
    assert in_generation[0] > 0 and in_generation[1] == 0, in_generation
    assert in_rollout[1] > 0, "the 4-bit layers did not compute in 4-bit again after generation"
    plain, dense = batches
    assert torch.equal(plain.responses, dense.responses)
    torch.testing.assert_close(plain.logprobs, dense.logprobs, atol=1e-6, rtol=1e-6)
    _assert_same_rollout(plain, dense)


def test_rollout_chunks_grouped_by_length_give_what_chunks_in_row_order_give(rlhf_registry, tiny_data, device):
    """Rollout forwards over length-sorted chunks, each cut to its real columns, must return per row the reference
    logprobs, values and RM scores of chunks in row order (same sampled responses: same seed)."""
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.data import load_records
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer
    from rlhf.sequences import length_chunks

    model = _model_dir(rlhf_registry)
    reward = Registry(rlhf_registry).get("reward:latest").path
    tok = load_tokenizer(model)
    ac = build_actor_critic(model, tok, load_in_4bit=False, lora_r=4, lora_alpha=8, lora_target_modules="all-linear",
                            reward_dir=reward, separate_reward=None, device=device)
    prompts = encode_prompts(tok, [r["messages"] for r in load_records(str(tiny_data["prompts"]), "prompt")[:7]], 32)
    assert len({len(x) for x in prompts}) > 2, "prompts of several lengths are what this test is about"
    out = {}
    for group in (True, False):
        cfg = dict(temperature=1.0, response_length=10, forward_batch_size=3, group_by_length=group)
        torch.manual_seed(0)
        out[group] = _rollout(ac, tok, prompts, cfg)
    a, b = out[True], out[False]
    _assert_same_rollout(a, b)
    chunks = length_chunks(a.attention_mask, 3, True)
    lengths = a.attention_mask.sum(1)
    assert sorted(torch.cat(chunks).tolist()) == list(range(7))
    assert [int(lengths[c].max()) for c in chunks] == sorted(int(lengths[c].max()) for c in chunks)
    assert int(lengths[chunks[0]].max()) < int(lengths.max()), "the first chunk must be narrower than the batch"


def test_fused_roles_give_the_update_of_one_forward_per_role(rlhf_registry, tmp_path):
    """ppo_update with policy and value in one forward (one backward of the summed loss) changes every trainable
    tensor as one forward and backward per role does."""
    model = _model_dir(rlhf_registry)
    for fuse in ("1", "0"):
        res = run_script(WORKER, model, str(tmp_path / f"f{fuse}.safetensors"), "2", "1", fuse)
        assert res.returncode == 0, res.stderr[-2000:]
    _assert_same_update(load_file(str(tmp_path / "f1.safetensors")), load_file(str(tmp_path / "f0.safetensors")))


def _actor_critic_with_distinct_adapters(rlhf_registry, load_in_4bit: bool, device=torch.device("cpu")):
    """The fixture's actor-critic with policy, value and reward adapters moved apart (each LoRA B is 0 at the
    start, so every role would otherwise compute the same thing and a mixed-up role could not show)."""
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.models import load_tokenizer

    model = _model_dir(rlhf_registry)
    reward = Registry(rlhf_registry).get("reward:latest").path
    tok = load_tokenizer(model)
    ac = build_actor_critic(model, tok, load_in_4bit=load_in_4bit, lora_r=4, lora_alpha=8,
                            lora_target_modules="all-linear", reward_dir=reward, separate_reward=None,
                            device=device, fuse_roles=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ac.model.named_parameters():
            for k, role in enumerate(("policy", "value", "reward")):
                if f"lora_B.{role}." in name:
                    p.add_((0.05 + 0.05 * k) * torch.randn(p.shape, generator=g).to(p.device))
    return ac, tok


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_fused_roles_give_what_one_forward_per_role_gives(rlhf_registry, tiny_data, device, load_in_4bit):
    """fuse_roles: the rollout's reference logprobs, values and RM scores, and the update's logits, values and
    gradients, equal those of one forward per role; in 4-bit too, where bitsandbytes' matmul output cannot be
    modified in place (peft's own mixed-adapter batches fail there on backward)."""
    from rlhf.data import load_records
    from rlhf.generation import encode_prompts

    ac, tok = _actor_critic_with_distinct_adapters(rlhf_registry, load_in_4bit, device)
    assert ac.unfused_reason is None and ac.fused
    prompts = encode_prompts(tok, [r["messages"] for r in load_records(str(tiny_data["prompts"]), "prompt")[:6]], 32)
    cfg = dict(temperature=0.8, response_length=10, forward_batch_size=4, group_by_length=True)
    out, grads, update = {}, {}, {}
    for fused in (True, False):
        ac.fused = fused
        torch.manual_seed(0)
        out[fused] = batch = _rollout(ac, tok, prompts, cfg)
        logits, values = ac.update_forward(batch.query_responses, batch.attention_mask, batch.responses.shape[1])
        (logits.logsumexp(-1).mean() + (values * batch.attention_mask).pow(2).mean()).backward()
        missing = [n for n, p in ac.trainable_named_parameters() if p.grad is None]
        assert not missing, (fused, missing[:3], len(missing))
        grads[fused] = {n: p.grad.clone() for n, p in ac.trainable_named_parameters()}
        update[fused] = {"logits": logits.detach(), "values": values.detach()}
        ac.model.zero_grad(set_to_none=True)
        ac.value_head.zero_grad(set_to_none=True)
    a, b = out[True], out[False]
    _assert_same_rollout(a, b)
    mask = a.mask.bool()
    real = a.attention_mask.bool()
    torch.testing.assert_close(update[True]["values"][real], update[False]["values"][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(update[True]["logits"], update[False]["logits"], atol=1e-4, rtol=1e-5)
    assert not torch.allclose(a.ref_logprobs[mask], a.logprobs[mask], atol=1e-3), "policy == reference"
    _assert_same_update(grads[True], grads[False])
    assert all(g.abs().max() > 0 for n, g in grads[True].items() if "lora_B" in n), "an adapter got no gradient"


def test_roles_fall_back_to_one_forward_each_when_the_fused_forward_disagrees(rlhf_registry, monkeypatch, device):
    """A model whose logits are not its LM head on the last hidden state (e.g. soft-capped) must not be fused: the
    start-up probe sees the difference, keeps one forward per role and says why."""
    from rlhf.ppo.actor_critic import ActorCritic

    lm_logits = ActorCritic._lm_logits
    monkeypatch.setattr(ActorCritic, "_lm_logits", lambda self, h, n: 30 * torch.tanh(lm_logits(self, h, n) / 30))
    ac, _ = _actor_critic_with_distinct_adapters(rlhf_registry, load_in_4bit=False, device=device)
    assert not ac.fused and ac.unfused_reason.startswith("reference logits differ by")


def test_trim_columns_keeps_exactly_the_window_of_real_tokens():
    """A micro-batch drops the prompt columns padded in all its rows (left) and the response columns after
    every row's last token (right), and nothing else."""
    from rlhf.sequences import trim_columns

    P = 5  # prompts left-padded to 5 tokens, responses right-padded to 4
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0],
                         [0, 0, 0, 1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 0, 1, 1, 1, 1, 0]])
    assert trim_columns(mask, P) == (2, 3, 3)
    assert trim_columns(mask[1:2], P) == (3, 2, 1)
    assert trim_columns(torch.ones(2, 9, dtype=torch.long), P) == (0, 5, 4)


def test_generation_dequantizes_unless_told_not_to_or_on_a_gpu_or_when_the_copy_would_crowd_memory():
    """Unset, dequantize_for_generation is on only on the CPU and only when the full-precision copy takes at most a
    quarter of the memory available: a model loaded in 4-bit so that it fits must not be pushed out of memory."""
    from rlhf.quant import choose_dequantize_for_generation as choose

    assert choose(None, "cpu", 324, 16000)[0] is True
    assert choose(None, "cpu", 324, None)[0] is True  # memory unknown (no /proc/meminfo)
    assert choose(None, "cpu", 26000, 64000) == (False, "unset, and the copy (26000 MiB) would take more than "
                                                        "a quarter of the 64000 MiB available")
    assert choose(None, "cuda", 324, 16000)[0] is False
    assert choose(True, "cuda", 324, 16000)[0] is True and choose(False, "cpu", 324, 16000)[0] is False
    assert choose(True, "cpu", 0, 16000)[0] is False  # full precision: nothing to dequantize


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(src, dst)
    return dst


def test_cli_end_to_end_trains_the_policy_and_registers_with_parents(rlhf_registry, tiny_data, tmp_path):
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--fuse_roles", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "model memory" in res.stderr and "4-bit NF4" in res.stderr
    assert "roles fused: reference+value+reward in the rollout, policy+value in the update" in res.stderr
    assert "generation on weights dequantized once per rollout" in res.stderr  # unset: on, on the CPU
    r = Registry(reg)
    ppo = r.get("ppo:latest")
    assert ppo.parents == [r.get("sft:latest").ref, r.get("reward:latest").ref]
    assert ppo.config["base_loading"]["load_in_4bit"] is True
    assert ppo.config["toxicity_scorer"]["spec"] == "profanity-check"
    # LoRA B matrices start at zero: any non-zero B means the policy adapter was trained.
    policy = load_file(str(ppo.path / "policy" / "adapter_model.safetensors"))
    lora_b = [v for k, v in policy.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)
    rows = [json.loads(line) for line in (ppo.path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {"objective/score", "objective/toxicity", "objective/kl", "val/explained_variance",
                               "timing/rollout_s", "episodes_per_s"} <= set(rows[0])
    assert list((ppo.path / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events in the entry"
    # The policy of every checkpointed step (save_steps 1) is kept for stage 04's frontier.
    assert sorted(p.name for p in (ppo.path / "snapshots").iterdir()) == ["step-1", "step-2"]
    assert (ppo.path / "snapshots" / "step-1" / "policy" / "adapter_model.safetensors").is_file()
    assert not list((reg / ".work").glob("ppo-*")), "work folder left behind after registering"


@pytest.mark.parametrize("estimator", ["gae", "rloo"])
def test_killed_run_resumes_and_matches_an_uninterrupted_run(rlhf_registry, tiny_data, tmp_path, estimator):
    """SIGKILL after a checkpoint, then --resume: the following steps match an uninterrupted run (with a critic,
    and without one: the checkpoint then holds the policy alone)."""
    args = ["--data", str(tiny_data["prompts"]), *TINY_PPO, "--total_episodes", "32", "--num_ppo_epochs", "1",
            "--advantage_estimator", estimator, "--num_generations", "2"]
    keys = ("objective/score", "objective/kl", "objective/toxicity", "loss/policy") + (
        ("val/vf_loss",) if estimator == "gae" else ())
    ref_reg = _copy(rlhf_registry, tmp_path / "a")
    res = run_script("stages/03_ppo.py", "--registry", str(ref_reg), *args)
    assert res.returncode == 0, res.stderr[-3000:]
    reference = [json.loads(x) for x in (Registry(ref_reg).get("ppo:latest").path / "metrics.jsonl").read_text().splitlines()]

    reg = _copy(rlhf_registry, tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "stages/03_ppo.py", "--registry", str(reg), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    state = None
    while time.time() < deadline and proc.poll() is None:  # wait for the event: a checkpoint of step >= 2
        states = list((reg / ".work").glob("ppo-*/checkpoint-*/trainer_state.json"))
        if states:
            try:
                state = json.loads(states[0].read_text())
            except (OSError, json.JSONDecodeError):
                state = None
            if state and state["step"] >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert Registry(reg).entries("ppo") == []

    res = run_script("stages/03_ppo.py", "--registry", str(reg), *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed at step" in res.stderr
    entries = Registry(reg).entries("ppo")
    assert len(entries) == 1
    resumed = [json.loads(x) for x in (entries[0].path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for want, got in zip(reference, resumed):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4), (got["step"], key)
    assert not list((reg / ".work").glob("ppo-*")) and not list((reg / ".staging").glob("ppo-*"))


def test_critic_learning_rate_applies_to_the_value_adapter_and_head_only(rlhf_registry, tiny_data, tmp_path):
    """--vf_learning_rate near 0 leaves the critic at its start (the reward adapter and head) while the policy
    still trains at learning_rate."""
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--vf_learning_rate", "1e-12")
    assert res.returncode == 0, res.stderr[-3000:]
    r = Registry(reg)
    ppo, reward = r.get("ppo:latest"), r.get("reward:latest")
    value = load_file(str(ppo.path / "value" / "adapter_model.safetensors"))
    start = load_file(str(reward.path / "adapter" / "adapter_model.safetensors"))
    _assert_same_tensors(value, start, atol=1e-8)
    _assert_same_tensors(load_file(str(ppo.path / "value_head.safetensors")),
                         load_file(str(reward.path / "score_head.safetensors")), atol=1e-8)
    policy = load_file(str(ppo.path / "policy" / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 1e-4 for k, t in policy.items() if "lora_B" in k), "the policy did not train"


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_a_wider_value_adapter_starts_as_the_reward_model_and_trains_its_new_directions(rlhf_registry, tmp_path,
                                                                                          device, load_in_4bit):
    """value_lora_r above the reward adapter's rank: the critic's first values are still the RM's scores (the copy
    is widened, not replaced), and its new directions get gradients."""
    from safetensors.torch import save_file

    from rlhf.models import load_tokenizer
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.reward_model import adapter_dir
    from rlhf.sequences import last_token_index, left_pad

    model = _model_dir(rlhf_registry)
    reward = tmp_path / "reward"  # the fixture's adapter has B = 0; give it B != 0 so it changes the output
    shutil.copytree(Registry(rlhf_registry).get("reward:latest").path, reward)
    adapter = adapter_dir(reward)
    g = torch.Generator().manual_seed(0)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v + 0.2 * torch.randn(v.shape, generator=g) if "lora_B" in k else v for k, v in weights.items()},
              str(adapter / "adapter_model.safetensors"))
    tok = load_tokenizer(model)
    ac = build_actor_critic(model, tok, load_in_4bit=load_in_4bit, lora_r=4, lora_alpha=8,
                            lora_target_modules="all-linear", reward_dir=reward, separate_reward=None,
                            device=device, value_lora_r=12)
    assert ac.model.peft_config["reward"].r == 4 and ac.model.peft_config["value"].r == 12
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]], tok.pad_token_id)
    ids, mask, rows = ids.to(device), mask.to(device), torch.arange(3, device=device)
    with torch.no_grad():
        scores = ac.reward_scores(ids, mask)
        with ac.role(None):  # the base alone, read by the same head: what an unloaded adapter would give
            h = ac.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        base_scores = ac.reward_head(h[rows, last_token_index(mask)]).squeeze(-1)
    assert (scores - base_scores).abs().max() > 1e-2, "the reward adapter must matter for this check to mean anything"
    values = ac.values(ids, mask)
    torch.testing.assert_close(values[rows, last_token_index(mask)].detach(), scores, atol=1e-5, rtol=1e-5)
    (values * mask).pow(2).sum().backward()
    layers = [m for m in ac.model.modules() if "value" in getattr(m, "lora_B", {})]
    assert layers and all(m.lora_B["value"].weight.shape[1] == 12 for m in layers)
    assert all(m.lora_B["value"].weight.grad[:, 4:].abs().max() > 0 for m in layers), "new directions get no gradient"


def test_value_rank_below_the_reward_adapter_is_refused_before_anything_runs(rlhf_registry, tiny_data, tmp_path):
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--value_lora_r", "2")
    assert res.returncode != 0 and "value_lora_r (2) is below the rank of reward:" in res.stderr
    assert "at least that rank" in res.stderr and "Traceback" not in res.stderr
    assert Registry(reg).entries("ppo") == []


def test_cli_value_lora_r_saves_a_value_adapter_of_that_rank(rlhf_registry, tiny_data, tmp_path):
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--value_lora_r", "8")
    assert res.returncode == 0, res.stderr[-3000:]
    ppo = Registry(reg).get("ppo:latest")
    assert json.loads((ppo.path / "value" / "adapter_config.json").read_text())["r"] == 8
    assert json.loads((ppo.path / "policy" / "adapter_config.json").read_text())["r"] == 4


def test_batch_sizes_that_do_not_divide_are_refused_with_the_names(rlhf_registry, tiny_data, tmp_path):
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]),
                     *TINY_PPO, "--per_device_train_batch_size", "0")
    assert res.returncode != 0 and "per_device_train_batch_size must be > 0" in res.stderr
    assert "Traceback" not in res.stderr and Registry(reg).entries("ppo") == []


def test_wrong_stage_reference_for_the_reward_model_is_refused(rlhf_registry, tiny_data, tmp_path):
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]),
                     *TINY_PPO, "--reward_model", "sft:latest")
    assert res.returncode != 0
    assert "is a 'sft' entry, not 'reward'" in res.stderr or "needs a 'reward' entry" in res.stderr
    assert "Traceback" not in res.stderr and Registry(reg).entries("ppo") == []


def test_reward_model_on_its_own_weights_is_loaded_separately(rlhf_registry, tiny_data, tmp_path):
    """A `model`-kind reward entry (a full sequence classifier) scores decoded responses on its own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reg = _copy(rlhf_registry, tmp_path)
    r = Registry(reg)
    sft = r.get("sft:latest")
    rm = AutoModelForSequenceClassification.from_pretrained(str(sft.path), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(sft.path))
    rm.config.pad_token_id = tok.pad_token_id
    staged = r.staging_dir("reward")
    rm.save_pretrained(staged)
    tok.save_pretrained(staged)
    entry = r.register("reward", staged, parents=[sft.ref], config={"reward_kind": "model", "base_model": sft.ref},
                       metrics={"reward_mean": 0.0, "reward_std": 1.0})
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--reward_model", entry.ref, "--fuse_roles", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded separately" in res.stderr
    assert "roles fused: reference+value in the rollout, policy+value in the update" in res.stderr
    ppo = r.get("ppo:latest")
    assert ppo.config["reward_shares_base"] is False and ppo.parents[-1] == entry.ref


@pytest.mark.parametrize("estimator,extra", [
    ("grpo", ["--kl_in_loss", "true", "--kl_estimator", "k3", "--loss_type", "grpo", "--fuse_roles", "true"]),
    ("rloo", ["--load_in_4bit", "false", "--toxicity_budget", "0.0"]),
    ("reinforce_pp", ["--num_generations", "1", "--loss_type", "dr_grpo"]),
])
def test_cli_critic_free_estimators_build_no_critic_and_log_each_reward_component(rlhf_registry, tiny_data, tmp_path,
                                                                                   estimator, extra):
    """A critic-free run registers a ppo entry with parents sft and reward that holds the policy adapter only (no
    value adapter or head), records its estimator and reward components, and logs each component per step."""
    reg = _copy(rlhf_registry, tmp_path)
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, completion_ids, **kwargs):\n"
        "    return [1.0 / (1 + len(ids)) for ids in completion_ids]\n")
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--advantage_estimator", estimator, "--num_generations", "2",
                     "--reward_funcs", f"rm,toxicity,{tmp_path / 'my_rewards.py'}:brevity", "--reward_weights", "1,1,0.5",
                     *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"[ppo] {estimator}: one base" in res.stderr and "policy/ref/reward" in res.stderr
    if "--fuse_roles" in extra:
        assert "roles fused: reference+reward in the rollout, the policy alone in the update" in res.stderr
    r = Registry(reg)
    ppo = r.get("ppo:latest")
    assert ppo.parents == [r.get("sft:latest").ref, r.get("reward:latest").ref]
    assert ppo.config["advantage_estimator"] == estimator and ppo.config["critic"] is False
    assert [c["name"] for c in ppo.config["reward_components"]] == ["rm", "toxicity", "brevity"]
    assert (ppo.path / "policy" / "adapter_model.safetensors").exists()
    assert not (ppo.path / "value").exists() and not (ppo.path / "value_head.safetensors").exists()
    rows = [json.loads(line) for line in (ppo.path / "metrics.jsonl").read_text().splitlines()]
    assert {"objective/reward/rm", "objective/reward/toxicity", "objective/reward/brevity"} <= set(rows[0])
    assert not any(k.startswith("val/") for k in rows[0])
    assert 0 < rows[0]["objective/reward/brevity"] <= 0.5
    assert ("loss/kl" in rows[0]) == ("--kl_in_loss" in extra)
    if "--toxicity_budget" in extra:  # the Lagrange multiplier on the toxicity component rises above a budget of 0
        assert rows[0]["objective/reward/toxicity"] > 0
        assert rows[1]["objective/toxicity_coef"] > rows[0]["objective/toxicity_coef"]


@pytest.mark.parametrize("args,message", [
    (["--advantage_estimator", "grpo", "--num_generations", "1"],
     "advantage_estimator grpo compares the responses to one prompt with each other: set num_generations to 2"),
    (["--advantage_estimator", "rloo", "--num_generations", "3"],
     "num_generations (3) must divide the responses sampled per step and process, per_device_train_batch_size × "
     "gradient_accumulation_steps × num_mini_batches = 4 × 1 × 2 = 8"),
    (["--advantage_estimator", "grpo", "--num_generations", "2", "--value_lora_r", "8"],
     "value_lora_r is set, but advantage_estimator grpo has no critic"),
    (["--advantage_estimator", "ppo"], "advantage_estimator must be one of gae, grpo, dr_grpo, rloo"),
    (["--loss_type", "bnpo"], "loss_type must be one of dapo, grpo, dr_grpo"),
])
def test_bad_estimator_settings_are_refused_naming_the_fields(args, message):
    from conftest import load_stage
    from rlhf.config import parse_config
    from rlhf.errors import ConfigError

    ppo = load_stage("03_ppo.py")
    argv = ["--data", "prompts.jsonl", *TINY_PPO, *args]
    with pytest.raises(ConfigError) as err:
        parse_config(ppo.PPOStageConfig, argv)
    assert message in str(err.value)


def test_a_reward_function_that_does_not_import_is_refused_in_one_line_before_anything_loads(rlhf_registry, tiny_data,
                                                                                            tmp_path):
    reg = _copy(rlhf_registry, tmp_path)
    res = run_script("stages/03_ppo.py", "--registry", str(reg), "--data", str(tiny_data["prompts"]), *TINY_PPO,
                     "--reward_funcs", "rm,toxicity,nowhere:fn")
    assert res.returncode != 0
    assert "reward_funcs[2] = 'nowhere:fn': importing nowhere failed" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "model memory" not in res.stderr  # before any model loads
    assert Registry(reg).entries("ppo") == []


def test_a_response_ends_at_any_of_the_stop_tokens(rlhf_registry, tiny_data):
    """Stage 03 passes every stop token of the model (rlhf.models.stop_token_ids: the end of a turn, then e.g. Llama
    3's <|end_of_text|>): generation stops at any of them and the response's mask ends there. With every id of the
    vocabulary but one (x) a stop token, a response is x (forced first: min_new_tokens) then x again or a stop."""
    from rlhf.data import load_records
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.ppo.rollout import rollout

    model = _model_dir(rlhf_registry)
    tok = load_tokenizer(model)
    ac = build_actor_critic(model, tok, load_in_4bit=False, lora_r=4, lora_alpha=8, lora_target_modules="all-linear",
                            reward_dir=None, separate_reward=None, device=torch.device("cpu"), critic=False)
    prompts = encode_prompts(tok, [r["messages"] for r in load_records(str(tiny_data["prompts"]), "prompt")[:4]], 32)
    torch.manual_seed(0)
    x = tok.convert_tokens_to_ids(tok.tokenize(" hello"))[0]
    stops = [i for i in range(len(tok)) if i != x]
    out = rollout(ac, prompts, pad_token_id=tok.pad_token_id, eos_token_id=stops, temperature=1.0,
                  response_length=6, forward_batch_size=4, group_by_length=True, device=torch.device("cpu"))
    assert out.has_eos.all()
    for row, n in zip(out.responses, out.mask.sum(1).tolist()):
        assert n >= 2 and row[:n - 1].tolist() == [x] * (n - 1) and int(row[n - 1]) != x
        assert (row[n:] == tok.pad_token_id).all()
    assert out.values is None  # no critic: no value forward
