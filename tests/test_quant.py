"""rlhf.quant.FreedMemory: in the update phase, memory freed by large tensors leaves the process."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = """
import sys
import torch
from rlhf.quant import FreedMemory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
freed = FreedMemory(float(sys.argv[1]))
before = rss_mb()
freed.rollout()
x = torch.ones(4 * 2**20)  # a rollout-phase tensor, served by the heap, below a tensor that lives on
keep = [torch.ones(1000)]
del x
freed.update()  # hands the heap's free pages back, then maps large tensors
applied = freed.active
for _ in range(4):  # 16 MiB activations freed after use, small tensors living on in between
    x = torch.ones(4 * 2**20)
    keep.append(torch.ones(1000))
    del x
print(applied, rss_mb() - before)
"""


def _retained_mb(threshold_mb: float) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold_mb)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_large_tensors_are_returned_to_the_system():
    """A tensor the rollout freed in the heap's middle goes back at the switch to the update (malloc_trim);
    the update's large tensors go back when freed (mmap threshold)."""
    applied, retained = _retained_mb(4)
    assert applied
    assert retained < 8, f"{retained:.1f} MiB of freed 16 MiB tensors still resident"
    # The control: glibc's default keeps the freed tensors in the heap (what the setting is for).
    applied, retained_default = _retained_mb(0)
    assert not applied and retained_default >= 16


FAULTS_PROBE = """
import resource
import sys
import torch
from rlhf.quant import FreedMemory
freed = FreedMemory(4)
if sys.argv[1] == "glibc":  # the control: glibc's trim threshold of 128 KiB
    freed.libc.mallopt(FreedMemory.M_TRIM_THRESHOLD, 128 * 1024)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
x = torch.randn(256, 256)  # activations of 1 MiB: below the mmap threshold, served by the heap
def step():
    net(x).square().mean().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_within_a_phase_freed_heap_pages_are_reused_not_faulted_in_again():
    """Training steps free and reallocate the same activations. Within a phase the heap keeps its freed top
    pages for them; with glibc's trim threshold of 128 KiB (what a fixed mmap threshold leaves) they go back at
    nearly every free and each step faults them in again, zeroed."""
    faults = {}
    for kind in ("ours", "glibc"):
        out = subprocess.run([sys.executable, "-c", FAULTS_PROBE, kind], capture_output=True, text=True, cwd=ROOT,
                             timeout=120, check=True).stdout
        faults[kind] = int(out.split()[-1])
    assert faults["glibc"] > 1000, f"the control faulted only {faults['glibc']} pages: the probe tests nothing"
    assert faults["ours"] * 4 < faults["glibc"], faults


def test_a_limit_set_by_the_user_in_the_environment_is_left_alone(monkeypatch):
    from rlhf.quant import FreedMemory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert FreedMemory(4).active is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert FreedMemory(0).active is False


def test_a_library_version_the_speed_layer_was_not_written_for_is_named_and_detected():
    """The speed layer reads bitsandbytes' and peft's private APIs; a version other than the one it was written
    for is detected from the installed metadata, with a reason naming the package and both versions."""
    from importlib import metadata

    from rlhf.quant import WRITTEN_FOR, untested_reason

    installed = metadata.version("peft")
    assert untested_reason("peft", {"peft": "0.0"}) == f"peft {installed} is not the 0.0.x this speed path was written for"
    assert untested_reason("peft", {"peft": installed.rsplit(".", 1)[0]}) is None
    assert set(WRITTEN_FOR) == {"bitsandbytes", "peft"}


def test_on_an_untested_bitsandbytes_generation_stays_on_the_4bit_weights_and_says_why(monkeypatch):
    """Unset dequantize_for_generation falls back to the plain path on an untested bitsandbytes, with the reason
    for the log; an explicit setting is still the user's to make."""
    from rlhf import quant

    monkeypatch.setattr(quant, "BITSANDBYTES_UNTESTED", "bitsandbytes 9.9.0 is not the 0.50.x this speed path was written for")
    assert quant.choose_dequantize_for_generation(None, "cpu", 10.0, 1e6) == (
        False, "unset, and bitsandbytes 9.9.0 is not the 0.50.x this speed path was written for")
    assert quant.choose_dequantize_for_generation(True, "cpu", 10.0, 1e6)[0] is True
    monkeypatch.setattr(quant, "BITSANDBYTES_UNTESTED", None)
    assert quant.choose_dequantize_for_generation(None, "cpu", 10.0, 1e6) == (True, "unset, on the CPU")


def test_on_an_untested_peft_the_roles_run_one_forward_each_and_say_why(rlhf_registry, monkeypatch):
    """fuse_roles reads peft's LoRA internals: on a peft it was not written for, the actor-critic keeps one forward
    per role (never a fused forward that could be silently wrong) and gives the reason for the log."""
    import torch

    from rlhf import quant
    from rlhf.models import load_tokenizer
    from rlhf.ppo.actor_critic import build_actor_critic
    from rlhf.registry import Registry

    reason = "peft 9.9.0 is not the 0.21.x this speed path was written for"
    monkeypatch.setattr(quant, "PEFT_UNTESTED", reason)
    model = str(Registry(rlhf_registry).get("sft:latest").path)
    ac = build_actor_critic(model, load_tokenizer(model), load_in_4bit=False, lora_r=4, lora_alpha=8,
                            lora_target_modules="all-linear", reward_dir=None, separate_reward=None,
                            device=torch.device("cpu"), fuse_roles=True)
    assert not ac.fused and ac.unfused_reason == reason


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_a_4bit_load_keeps_no_tensor_inside_the_checkpoints_memory_map(rlhf_registry):
    """The tensors a 4-bit load leaves in full precision get memory of their own (rlhf.quant.own_unquantized_tensors):
    none may point into the checkpoint file's mapping, which would keep the whole file resident."""
    import bitsandbytes as bnb

    from rlhf.models import load_model
    from rlhf.registry import Registry

    folder = Registry(rlhf_registry).get("sft:latest").path
    model = load_model(str(folder), load_in_4bit=True)
    files = {str(p.resolve()) for p in folder.glob("*.safetensors")}
    ranges = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] in files:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    full = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not isinstance(t, bnb.nn.Params4bit) and t.numel()]
    assert full, "the model has full-precision tensors (embeddings, norms)"
    inside = [n for n, t in full if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    assert inside == [], f"still views of the checkpoint's memory map: {inside[:3]}"
