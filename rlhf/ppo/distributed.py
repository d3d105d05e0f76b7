"""Data parallelism for PPO, done by hand over `torch.distributed` (gloo on CPUs, NCCL on GPUs).

Each update micro-batch runs its policy and value losses through different adapters of one base
(two backward passes, or one through a fused forward), which a DDP wrapper does not fit; so the
gradients, the advantage statistics, the step's metrics and the decision to stop are averaged or
agreed here, and every process stays identical. With one process every function is a no-op or
its single-process counterpart.
"""

from __future__ import annotations

from torch import Tensor


def all_reduce_mean(tensors: list[Tensor], world_size: int) -> None:
    """Average tensors (gradients, statistics) over processes, in place."""
    if world_size == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size)


def global_mean_var(x: Tensor, mask: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """Mean and Bessel-corrected variance of `x` over the real tokens of every process."""
    import torch

    from rlhf.ppo.losses import masked_mean, masked_var

    if world_size == 1:
        return masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    m = mask.to(x.dtype)
    sums = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    all_reduce_mean([sums], world_size)
    n = sums[2] * world_size  # real tokens over every process
    mean = sums[0] / sums[2]
    return mean, (sums[1] / sums[2] - mean ** 2) * n / (n - 1).clamp(min=1.0)


def global_whiten(x: Tensor, mask: Tensor, world_size: int) -> Tensor:
    """Whiten `x` over the real tokens of every process: `masked_whiten` of the global batch (the same statistics
    with one process or several); pads are returned unchanged."""
    import torch

    from rlhf.ppo.losses import masked_whiten

    if world_size == 1:
        return masked_whiten(x, mask)
    mean, var = global_mean_var(x, mask, world_size)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), x)


def mean_over_processes(metrics: dict[str, float], world_size: int, device: str = "cpu") -> dict[str, float]:
    """Each float metric averaged over processes; integers (step counts) are the same everywhere and kept as they
    are. Every process gets the same dict, in the same key order. `device`: where the backend reduces (the
    process's GPU under NCCL)."""
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    if world_size == 1 or not keys:
        return metrics
    import torch

    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_mean([values], world_size)
    return {**metrics, **dict(zip(keys, values.tolist()))}


def any_process(flag: bool, world_size: int, device: str = "cpu") -> bool:
    """True on every process when `flag` is true on any one of them (a signal may reach only one rank, or
    reach the ranks at different steps; all must stop after the same step)."""
    if world_size == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
