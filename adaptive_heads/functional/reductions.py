"""Class-balanced reductions of per-pixel losses (no loop over classes, no host sync)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import float32_math, upcast_half
from .._validation import check_choice

__all__ = ["classwise_weighted_mean"]


def classwise_weighted_mean(
    values: Tensor,
    weights: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    average: str = "present",
    eps: float = 1e-12,
) -> Tensor:
    """Class-balanced weighted mean over all pixels of a batch (no loop, no host sync).

    ``L = 1/(|K| + eps) · Σ_{k∈K} Σ_i 1[t_i=k]·w_i·ℓ_i / (Σ_i 1[t_i=k]·w_i + eps)``, with K the classes
    present in ``labels`` (``average="present"``, the official CAC/SSA code) or all n classes
    (``average="all"``, CAC paper Eq. 11). An empty K gives exactly 0 (differentiably).

    Args:
        values: ``[...]`` per-pixel losses ℓ, any shape.
        weights: ``[...]`` per-pixel weights w, same shape.
        labels: ``[...]`` integer class per pixel, same shape.

    Returns:
        A scalar tensor (float32, or float64 for float64 input).

    Example:
        >>> values = torch.tensor([1.0, 3.0, 10.0])
        >>> weights = torch.ones(3)
        >>> labels = torch.tensor([0, 0, 1])
        >>> classwise_weighted_mean(values, weights, labels, 2)  # (mean of class 0 + mean of class 1) / 2
        tensor(6.)
    """
    check_choice("average", average, ("present", "all"))
    v = upcast_half(values).reshape(-1)
    wt = upcast_half(weights).reshape(-1).to(v.dtype)
    flat = labels.reshape(-1)
    valid = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        valid &= flat != ignore_index
    slot = torch.where(valid, flat, torch.full_like(flat, num_classes))  # ignored pixels: an extra bin
    with float32_math(v.device):
        columns = torch.stack([wt * v, wt, torch.ones_like(wt)], dim=-1)
        stats = v.new_zeros(num_classes + 1, 3).index_add_(0, slot, columns)[:num_classes]
        per_class = stats[:, 0] / (stats[:, 1] + eps)
        if average == "all":
            return per_class.sum() / num_classes
        present = (stats[:, 2] > 0).to(v.dtype)
        return (per_class * present).sum() / (present.sum() + eps)
