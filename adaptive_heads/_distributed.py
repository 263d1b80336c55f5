"""Tiny ``torch.distributed`` helpers: no-ops unless a process group with more than one rank exists."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``) over the default group; returns ``tensor``.

    Only used on statistics computed under ``no_grad`` (no autograd through the collective).
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor
