"""SSA-Seg's sigmoid dice over the classes present in each image, at label resolution without a full-size copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .labels import valid_labels
from .upsampled import upsampled_sigmoid_loss

__all__ = ["sigmoid_dice_loss", "sigmoid_dice_losses"]


def sigmoid_dice_losses(
    logits: Sequence[Tensor],
    target: Tensor,
    *,
    ignore_index: int | None = 255,
    align_corners: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """:func:`sigmoid_dice_loss` of several logits against the same labels, in one pass (SSA-Seg's student and
    teacher): ``[T]``. ``valid`` as for :func:`~adaptive_heads.functional.upsampled_cross_entropy_sums` (the labels
    already split by :func:`~adaptive_heads.functional.valid_labels`).

    Example:
        >>> student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> target = torch.randint(0, 3, (2, 8, 8))
        >>> both = sigmoid_dice_losses([student, teacher], target)
        >>> torch.allclose(both[1], sigmoid_dice_loss(teacher, target))
        True
    """
    n = logits[0].shape[1]
    safe, valid = valid_labels(target, n, ignore_index) if valid is None else (target, valid)
    b = safe.shape[0]
    # A + 1 per (image, class): the pixel counts on a start of 1 (the labels are in range; exact below 2^24)
    area_1 = torch.ones(b, n, device=safe.device).scatter_add_(1, safe.reshape(b, -1), valid.reshape(b, -1).float())
    return upsampled_sigmoid_loss(logits, safe, valid, _mean_dice, area_1, align_corners=align_corners)


def _mean_dice(total: Tensor, intersection: Tensor, area_1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mean dice over the present masks from the sums ``[T, B, n]`` and the class areas plus one ``[B, n]``,
    with its partial derivatives (an :data:`~adaptive_heads.functional.upsampled.SigmoidReduction`).

    ``d = 1 − r`` with ``r = (2I + 1) / D = 2h``, ``h = (I + 1/2) / D``, ``D = Σσ + A + 1``: ``∂r/∂I = 2/D``,
    ``∂r/∂Σσ = −2h/D``; the mean over the ``m`` present (image, class) masks carries the factor ``1[A > 0] / m``."""
    denom = total + area_1.to(total.dtype)
    half = intersection.add(0.5).div_(denom)  # r / 2
    present = (area_1 > 1).to(total.dtype)
    count = present.sum()
    masks = count.clamp_min(1.0)
    value = torch.sub(count, torch.mv(half.flatten(1), present.flatten()), alpha=2.0) / masks  # Σ (1 − r)·1[A>0] / m
    share = (present / denom).div_(masks * -0.5)  # [T, B, n]: −2·1[A > 0] / (m · D) = ∂value/∂I
    return value, share * -half, share


def sigmoid_dice_loss(
    logits: Tensor, target: Tensor, *, ignore_index: int | None = 255, align_corners: bool = True
) -> Tensor:
    """Per-(image, present class) sigmoid dice, averaged over those masks (SSA-Seg's ``loss_dice``).

    Logits are upsampled bilinearly to the label size without a full-resolution copy kept for backward
    (:func:`~adaptive_heads.functional.upsampled_sigmoid_stats`). For each image b and class c present in it,
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
    return sigmoid_dice_losses([logits], target, ignore_index=ignore_index, align_corners=align_corners)[0]
