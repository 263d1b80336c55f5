"""SSA-Seg's sigmoid dice over the classes present in each image, at label resolution without a full-size copy."""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import float32_math
from .pooling import class_pixel_counts
from .upsampled import upsampled_sigmoid_stats

__all__ = ["sigmoid_dice_loss"]


def sigmoid_dice_loss(
    logits: Tensor, target: Tensor, *, ignore_index: int | None = 255, align_corners: bool = True
) -> Tensor:
    """Per-(image, present class) sigmoid dice, averaged over those masks (SSA-Seg's ``loss_dice``).

    Logits are upsampled bilinearly to the label size, one row tile at a time (no full-resolution copy is
    kept for backward). For each image b and class c present in it,
    ``d = 1 − (2Σ σ(z_c)·1[y=c] + 1) / (Σ σ(z_c) + Σ 1[y=c] + 1)``; ignored pixels count as negatives for every
    class (as the official code). Returns ``Σ d / max(#masks, 1)``.

    Args:
        logits: ``[B, n, h, w]``.
        target: ``[B, H, W]`` labels.

    Example:
        >>> logits = torch.full((1, 2, 4, 4), -20.0)
        >>> logits[:, 1] = 20.0  # confident class 1 everywhere
        >>> target = torch.ones(1, 8, 8, dtype=torch.long)
        >>> round(sigmoid_dice_loss(logits, target).item(), 4)  # a perfect mask for the one class present
        0.0
    """
    n = logits.shape[1]
    valid = (target >= 0) & (target < n)
    if ignore_index is not None:
        valid &= target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    total, intersection = upsampled_sigmoid_stats(logits, safe, valid, align_corners=align_corners)
    with float32_math(logits.device):
        area = class_pixel_counts(safe, n, valid).to(total.dtype)
        dice = 1 - (2 * intersection + 1) / (total + area + 1)
        present = (area > 0).to(dice)
        return (dice * present).sum() / present.sum().clamp_min(1)
