"""4-bit loading, and the layer that makes PPO fast on a CPU: every use of a library's private API is here.

    quantization_config          NF4 with double quantization, compute dtype from the device
    set_cpu_4bit_packing         forbid bitsandbytes' CPU inference layout before training a 4-bit model
    dequantized_4bit             generation on weights dequantized once per rollout instead of per token
    choose_dequantize_for_generation   whether to, and why (for the log)
    FreedMemory                  glibc's allocator set per PPO phase, so freed activations leave the process
    lora_layers / adapters_off / mixed_lora_hook   the fused-roles forward (rlhf.ppo.actor_critic): several
                                 adapters in one batch, one copy of the rows each

Private APIs used, and the versions this was written for (`WRITTEN_FOR`):

    bitsandbytes   functional._convert_weight_packed_for_cpu_inverse, Linear4bit.support_avx512bf16_for_cpu,
                   quant_state.packing_format_for_cpu, functional.dequantize_4bit on a layer's quant_state
    peft           LoraLayer._disable_adapters, lora_A / lora_B / scaling / lora_dropout / lora_variant

The versions are read once, at import. On another version the speed paths fall back to the plain ones
and the reason reaches the stage's log line (`BITSANDBYTES_UNTESTED`, `PEFT_UNTESTED`): generation on
the 4-bit weights, one forward per role. Packing is a matter of correctness, not speed (a backward
through the packed layout fails): it is always switched off, and a layer already packed on a version
without the private inverse is refused with a message, never trained wrongly.

How much each path saves, and on which machine, is measured in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import torch

WRITTEN_FOR = {"bitsandbytes": "0.50", "peft": "0.21"}  # major.minor whose private APIs this module uses


def untested_reason(package: str, written_for: dict[str, str] = WRITTEN_FOR) -> str | None:
    """Why `package`'s private APIs are not used (None: its installed version is the one this was written for)."""
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return f"{package} is not installed"
    want = written_for[package]
    if version != want and not version.startswith(want + "."):
        return f"{package} {version} is not the {want}.x this speed path was written for"
    return None


BITSANDBYTES_UNTESTED = untested_reason("bitsandbytes")
PEFT_UNTESTED = untested_reason("peft")


# ---------------------------------------------------------------------------- 4-bit loading and packing


def quantization_config(load_in_4bit: bool) -> Any:
    """NF4 with double quantization; compute dtype bf16 on GPU, fp32 on CPU (`rlhf.models.compute_dtype`)."""
    if not load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    from rlhf.models import compute_dtype

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
    )


def own_unquantized_tensors(model: Any) -> int:
    """Give the tensors a 4-bit load left in full precision (embeddings, norms, biases, the LM head) memory of
    their own; return how many were copied. On the CPU they come out of loading as views of the checkpoint's
    memory-mapped file, which keeps the whole file's pages resident (a GPT-2-small PPO step: ~335 MiB of its
    peak RSS, docs/BENCHMARKS.md); copied, the mapping is released. The 4-bit weights are already copies."""
    import bitsandbytes as bnb
    import torch

    n = 0
    with torch.no_grad():
        for module in model.modules():
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if isinstance(t, bnb.nn.Params4bit) or t.device.type != "cpu":
                    continue
                t.data = t.data.clone()
                n += 1
    return n


def linear_4bit_layers(model: Any) -> list:
    """The bitsandbytes 4-bit linear layers of `model` ([] without bitsandbytes)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def set_cpu_4bit_packing(model: Any, enabled: bool) -> int:
    """Allow or forbid bitsandbytes' CPU inference layout for 4-bit weights; return the layers touched.

    On CPUs with AVX512-BF16, a `Linear4bit` in eval mode repacks its weight for a
    faster inference kernel and keeps that layout; a backward pass through the
    packed layout then fails (bitsandbytes 0.50: "a view of a leaf Variable ... in
    an in-place operation"). Training code that evaluates first forbids packing
    (and unpacks weights packed so far) before it trains.
    """
    layers = linear_4bit_layers(model)
    for module in layers:
        if not hasattr(module, "_rlhf_packing_supported"):
            module._rlhf_packing_supported = getattr(module, "support_avx512bf16_for_cpu", False)
        module.support_avx512bf16_for_cpu = enabled and module._rlhf_packing_supported
        state = getattr(module.weight, "quant_state", None)
        if not enabled and state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _unpack(module.weight.data, state)
    return len(layers)


def _unpack(data: Any, state: Any) -> tuple[Any, Any]:
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        raise RuntimeError(f"a 4-bit weight is in bitsandbytes' CPU inference layout, which cannot be trained, and "
                           f"this bitsandbytes ({BITSANDBYTES_UNTESTED or 'version'}) has no way to unpack it; "
                           f"install bitsandbytes {WRITTEN_FOR['bitsandbytes']}.x") from None
    return _convert_weight_packed_for_cpu_inverse(data, state)


# ---------------------------------------------------------------------------- generation on dequantized weights


def _dequantized_dtype(layer: Any) -> "torch.dtype":
    """The dtype bitsandbytes dequantizes a 4-bit layer's weight to: its compute dtype, else the weight's own."""
    return layer.compute_dtype if layer.compute_dtype is not None else layer.weight.quant_state.dtype


@contextmanager
def dequantized_4bit(model: Any, enabled: bool = True) -> Iterator[int]:
    """Within the block, every bitsandbytes 4-bit linear layer of `model` computes with its weight dequantized
    once on entry instead of at every call; yields the number of such layers (0 when not `enabled`).

    Same results: bitsandbytes itself dequantizes to the input's dtype and applies a plain linear layer, on the
    CPU at every call (it has no fused 4-bit kernel there without AVX-512 BF16). Generation calls each layer
    once per token, so that is where it pays. Costs a full-precision copy of those weights for the block.
    """
    import torch.nn.functional as F

    def dense(module: Any, weight: "torch.Tensor") -> Callable:
        def forward(x: "torch.Tensor") -> "torch.Tensor":
            bias = module.bias.to(weight.dtype) if module.bias is not None else None
            return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        return forward

    layers = linear_4bit_layers(model) if enabled else []
    if layers:
        from bitsandbytes.functional import dequantize_4bit
    patched = []
    try:
        for m in layers:
            state = m.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' fused CPU layout: left to it
                continue
            weight = dequantize_4bit(m.weight.data, state).to(_dequantized_dtype(m))
            m.forward = dense(m, weight)  # an instance attribute: shadows the class's forward until removed
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


def dequantized_4bit_mb(model: Any) -> float:
    """MiB that `dequantized_4bit` holds for `model`: each 4-bit layer's weight in its compute dtype."""
    return sum(m.weight.quant_state.shape.numel() * _dequantized_dtype(m).itemsize
               for m in linear_4bit_layers(model)) / 2**20


def available_memory_mb() -> float:
    """Memory the system can still give this process, in MiB (psutil's `available`)."""
    import psutil

    return psutil.virtual_memory().available / 2**20


def choose_dequantize_for_generation(setting: bool | None, device_type: str, copy_mb: float,
                                     available_mb: float | None) -> tuple[bool, str]:
    """Whether PPO generates on dequantized 4-bit weights (`dequantized_4bit`), and why, for the log.

    An explicit setting wins. Unset: on the CPU (bitsandbytes dequantizes at every call there) when the copy
    takes at most a quarter of the memory still available, so a large model loaded in 4-bit to fit is not
    pushed out of memory; off on GPUs, whose 4-bit kernels do not dequantize per call, and off on a
    bitsandbytes this was not written for."""
    if copy_mb == 0:
        return False, "no 4-bit layers"
    if setting is not None:
        return setting, f"dequantize_for_generation is {str(setting).lower()}"
    if BITSANDBYTES_UNTESTED:
        return False, f"unset, and {BITSANDBYTES_UNTESTED}"
    if device_type != "cpu":
        return False, f"unset, and on {device_type} the 4-bit kernels do not dequantize per call"
    if available_mb is not None and copy_mb > available_mb / 4:
        return False, (f"unset, and the copy ({copy_mb:.0f} MiB) would take more than a quarter of the "
                       f"{available_mb:.0f} MiB available")
    return True, "unset, on the CPU"


# ---------------------------------------------------------------------------- several adapters in one forward


def lora_layers(model: Any) -> list:
    """peft's LoRA layers of `model`, listed once (walking every module per forward costs)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def adapters_off(layers: list) -> Iterator[None]:
    """Every LoRA layer computes its base layer only: what peft's `disable_adapter()` does for the model (its flag
    `_disable_adapters`), on layers listed once. peft's own context manager walks every module and checks the
    model's status on each call, and re-enabling resets which adapters require gradients; neither is needed to
    switch a flag for one forward."""
    for m in layers:
        m._disable_adapters = True
    if layers and layers[0].disable_adapters is not True:  # a peft without that flag
        raise NotImplementedError("this peft version's LoRA layers have no _disable_adapters flag")
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


def mixed_lora_hook(roles: list[str | None], rows: int) -> Callable:
    """A forward hook (`register_forward_hook(..., with_kwargs=True)`) for a LoRA layer whose input is the rows
    repeated once per role: copy k gets the LoRA term of adapter `roles[k]` (`None`: none) added to the base
    layer's output. Out of place, so autograd also works through bitsandbytes' 4-bit matmul, whose output
    peft's own mixed-adapter batches would modify in place.

    The copies are the input's first dimension cut in `len(roles)` equal blocks: `rows` rows each for a
    (n·rows, T, H) input, `rows`·T tokens each where the model flattens tokens first (OPT's feed-forward
    layers take (n·rows·T, H)); either way copy k is block k."""
    import torch
    import torch.nn.functional as F

    def add_lora(module: Any, args: tuple, kwargs: dict, out: "torch.Tensor") -> "torch.Tensor":
        x = args[0] if args else kwargs["x"]
        size, left = divmod(out.shape[0], len(roles))
        if left or size % rows:
            raise ValueError(f"a LoRA layer's input has {out.shape[0]} rows, not a multiple of {len(roles)} "
                             f"copies of {rows} rows")
        parts = []
        for k, role in enumerate(roles):
            part = out[k * size:(k + 1) * size]
            if role is not None and role in module.lora_A:
                if role in module.lora_variant:
                    raise NotImplementedError(f"a LoRA variant ({type(module.lora_variant[role]).__name__})")
                A, B = module.lora_A[role], module.lora_B[role]
                xk = x[k * size:(k + 1) * size].to(A.weight.dtype)
                if module.training:  # dropout is the identity in eval mode, which PPO runs in
                    xk = module.lora_dropout[role](xk)
                # A and B are plain Linear layers: their weights directly, without a module call each.
                lora = F.linear(F.linear(xk, A.weight, A.bias), B.weight, B.bias)
                part = part + (lora * module.scaling[role]).to(out.dtype)
            parts.append(part)
        return torch.cat(parts)

    return add_lora


# ---------------------------------------------------------------------------- freed memory back to the system


class FreedMemory:
    """Give the memory freed by PPO's update back to the system as a run goes (glibc's malloc only).

    glibc serves large allocations with mmap and unmaps them on free, but after the first such free it
    raises that size limit (up to 32 MiB), so later activation tensors come from the heap and stay
    resident once freed: by default the process's resident memory climbs with every update forward to
    several times what is ever in use together. The setting switches by phase:

        loading, update   tensors >= `threshold_mb` are mapped, and unmapped when freed
        rollout           the heap serves tensors up to 32 MiB: generation copies its KV cache one
                          token at a time, and mapping each copy costs time
        rollout -> update `malloc_trim` hands the heap's free pages back first

    Within a phase the heap keeps the free pages at its top (trim threshold 1 GiB) for the next tensors.
    With a fixed mmap threshold glibc's trim threshold stays at 128 KiB: nearly every free at the heap's
    top gave pages back and the next allocation faulted them in again, zeroed. The kept pages are
    reused, not added: `malloc_trim` at the phase switch hands them back.

    Does nothing when `threshold_mb` is 0, off glibc (musl, macOS), or when the user set
    MALLOC_MMAP_THRESHOLD_. GPU memory is not affected (CUDA has its own caching allocator).
    """

    M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
    M_MMAP_THRESHOLD = -3
    KEEP_HEAP_TOP_MB = 1024  # trim threshold within a phase
    MAX_THRESHOLD_MB = 32  # glibc refuses larger values on 64-bit systems

    def __init__(self, threshold_mb: float):
        self.threshold_mb = threshold_mb
        self.libc = _glibc() if threshold_mb > 0 else None
        self.active = self.libc is not None
        if self.active:
            self.libc.mallopt(self.M_TRIM_THRESHOLD, self.KEEP_HEAP_TOP_MB * 2**20)
        self.update()

    def rollout(self) -> None:
        if self.active:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.MAX_THRESHOLD_MB * 2**20)

    def update(self) -> None:
        if self.active:
            self.libc.malloc_trim(0)
            self.libc.mallopt(self.M_MMAP_THRESHOLD, int(min(self.threshold_mb, self.MAX_THRESHOLD_MB) * 2**20))


def _glibc() -> Any | None:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist only in glibc)
    except (OSError, AttributeError):
        return None
    return libc
