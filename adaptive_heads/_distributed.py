"""Tiny ``torch.distributed`` helpers: no-ops unless a process group with more than one rank exists."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "all_reduce_class_statistics", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``) over the default group; returns ``tensor``.

    Only used on statistics computed under ``no_grad`` (no autograd through the collective).
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_reduce_class_statistics(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-class ``sums [n, C]`` and ``counts [n]`` over every rank, in one ``[n, C + 1]`` all-reduce.

    Autograd-aware: the backward all-reduces the gradient of the sums, so each rank's features receive the
    gradient of every rank's loss through the shared statistics, as in one process on the concatenated batch.
    A no-op without an initialised process group of more than one rank.
    """
    if not is_distributed():
        return sums, counts
    packed = _AllReduceSum.apply(torch.cat([sums, counts.unsqueeze(-1).to(sums.dtype)], dim=-1))
    return packed[..., :-1], packed[..., -1].detach().to(counts.dtype)


class _AllReduceSum(torch.autograd.Function):
    """``Σ_ranks x``; the gradient of a sum shared by every rank is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out
