"""Losses of the SSA-Seg classifier: CE terms, boundary-split response distillation, dice, and the semantic
relation and spatial (position) distillation."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import HeadLoss
from .functional import (
    class_pixel_counts,
    classwise_weighted_mean,
    float32_math,
    resize_labels_nearest,
    soft_distillation,
    upcast_half,
)
from .functional import upsampled_cross_entropy as _ce
from .ssa import SSAOutput
from .upsampled_ce import upsampled_sigmoid_stats
from .validation import check_choice

__all__ = [
    "SSALoss",
    "boundary_distillation",
    "label_boundary",
    "position_distillation",
    "relation_distillation",
    "sigmoid_dice_loss",
    "ssa_loss",
]

DEFAULT_WEIGHTS = {
    "ce": 1.0,
    "ce_coarse": 1.0,
    "ce_teacher": 1.0,
    "distill": 1.0,
    "dice": 1.0,
    "dice_teacher": 1.0,
    "relation": 10.0,
    "position": 0.4,
}


def label_boundary(labels: Tensor, *, border: int = 6, dilation: int = 3) -> Tensor:
    """Boundary band of a label map, computed on the device (the official code runs OpenCV Canny on the CPU).

    A pixel is an edge if its right or lower neighbour has another label (the ignore value counts as a label,
    as in the official ``uint8`` image). This is the pixel Canny's non-maximum suppression keeps on a step
    between two labels (the first of the two equal-magnitude pixels); diagonal steps are found through their
    horizontal and vertical components. Edges within ``border`` pixels of the image border are dropped and the
    rest is dilated with a ``dilation × dilation`` square, as the official code does. Maps smaller than
    ``2·border`` simply have no boundary pixels (the official code crashes on them).

    Args:
        labels: ``[B, h, w]`` integer labels.

    Returns:
        ``[B, h, w]`` float mask in {0, 1}, same device.
    """
    b, h, w = labels.shape
    edge = torch.zeros(b, h, w, dtype=torch.bool, device=labels.device)
    edge[:, :, :-1] |= labels[:, :, :-1] != labels[:, :, 1:]
    edge[:, :-1, :] |= labels[:, :-1, :] != labels[:, 1:, :]
    if border > 0:
        rows = torch.arange(h, device=labels.device)
        cols = torch.arange(w, device=labels.device)
        inner_r = (rows >= border) & (rows < h - border)
        inner_c = (cols >= border) & (cols < w - border)
        edge &= inner_r.view(1, h, 1) & inner_c.view(1, 1, w)
    band = edge.unsqueeze(1).float()
    if dilation > 1:
        band = F.max_pool2d(band, dilation, stride=1, padding=dilation // 2)
    return band[:, 0, :h, :w]


def boundary_distillation(
    student: Tensor,
    teacher: Tensor,
    feature_target: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    mix: float = 0.5,
    boundary: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """SSA-Seg's response distillation ("KLLoss"), at feature resolution.

    The per-pixel soft CE toward ``mix·softmax(teacher) + (1-mix)·onehot`` weighted by the teacher entropy
    (:func:`~adaptive_heads.functional.soft_distillation`), averaged per class separately over the boundary
    band ``β`` and the interior ``1-β``; ``L_c = (L_boundary,c + L_interior,c) / 2``, averaged over the classes
    present in the batch. 0 when no pixel is valid. Always float32 (the official code leaks float64).

    Args:
        student, teacher: ``[B, n, h, w]`` logits (the teacher is detached).
        feature_target: ``[B, h, w]`` labels.
        boundary: ``[B, h, w]`` band; default :func:`label_boundary` of ``feature_target``.
    """
    loss, entropy, _ = soft_distillation(student, teacher, feature_target, ignore_index=ignore_index, mix=mix)
    beta = label_boundary(feature_target) if boundary is None else boundary
    with float32_math(student.device):
        beta = beta.to(loss.dtype)
        kwargs = {"ignore_index": ignore_index, "eps": eps}
        edge = classwise_weighted_mean(loss, entropy * beta, feature_target, num_classes, **kwargs)
        inner = classwise_weighted_mean(loss, entropy * (1 - beta), feature_target, num_classes, **kwargs)
        return 0.5 * (edge + inner)


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


def relation_distillation(student: Tensor, teacher: Tensor, scale: float = 15.0) -> Tensor:
    """SSA-Seg's semantic-domain distillation (``disLoss``, weight 10 in :class:`SSALoss`).

    ``R(Z) = softmax_rows(scale · Ẑ · stopgrad(Ẑ)ᵀ)`` with ``Ẑ`` the L2-normalised ``[B, n, C]`` prototypes;
    the loss is ``mean_{b,k} Σ_{j≠k} relu(R(S)[k, j] − R(T)[k, j])`` with the teacher ``T`` detached: the
    student is only penalised where its inter-class similarity exceeds the teacher's.
    """

    def relation(z: Tensor) -> Tensor:
        z = F.normalize(upcast_half(z), dim=-1)
        return torch.softmax(scale * z @ z.detach().transpose(-1, -2), dim=-1)

    with float32_math(student.device):
        r_s = relation(student)
        r_t = relation(teacher.detach()).expand_as(r_s)
        off_diagonal = 1 - torch.eye(r_s.shape[-1], device=r_s.device, dtype=r_s.dtype)
        return torch.relu((r_s - r_t) * off_diagonal).sum(-1).mean()


def position_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """SSA-Seg's spatial-domain distillation (``pos_disLoss``, weight 0.4 in :class:`SSALoss`).

    ``mean_{b,k} [−Σ_c softmax_c(T)[k, c] · log_softmax_c(S)[k, c]]``: a soft CE over the **channel** axis of
    each ``[B, n, C]`` prototype, teacher detached, all n classes included.
    """
    with float32_math(student.device):
        log_s = torch.log_softmax(upcast_half(student), dim=-1)
        q = torch.softmax(upcast_half(teacher.detach()), dim=-1).expand_as(log_s)
        return -(q * log_s).sum(-1).mean()


def ssa_loss(
    out: SSAOutput,
    target: Tensor,
    *,
    ignore_index: int | None = 255,
    weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    main_average: str = "valid",
) -> dict[str, Tensor]:
    """Functional form of :class:`SSALoss`."""
    return SSALoss(ignore_index=ignore_index, weights=weights, reduction=reduction, main_average=main_average)(
        out, target
    )


class SSALoss(HeadLoss):
    """Every SSA-Seg training term, as the official code computes them; ``loss`` is their weighted sum.

    - ``ce``: CE of the SSA logits (main term), ``ce_coarse``: CE of the coarse mask, ``ce_teacher``: CE of the
      teacher (not detached — it trains the ``gt_*`` layers); all upsampled bilinearly with
      ``align_corners=True`` and averaged over valid pixels (``main_average="all"``: the official mmseg main
      term divides by all pixels);
    - ``distill``: :func:`boundary_distillation` (feature resolution);
    - ``dice`` / ``dice_teacher``: :func:`sigmoid_dice_loss` on student / teacher;
    - ``relation`` (×10): :func:`relation_distillation` of ``S_p`` toward ``S_p^T``;
    - ``position`` (×0.4): :func:`position_distillation` of ``P_p`` toward ``P_p^T``.

    The official sigmoid focal loss, computed and then discarded, is not computed. Everything is float32 and
    finite on all-ignored batches (the official code returns float64, and NaN there).
    """

    default_weights = DEFAULT_WEIGHTS
    output_type = SSAOutput
    main_term = "ce"

    def __init__(
        self,
        *,
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        main_average: str = "valid",
        distill_mix: float = 0.5,
        tau: float = 15.0,
    ) -> None:
        super().__init__(weights, reduction, ignore_index)
        check_choice("main_average", main_average, ("valid", "all"))
        self.main_average = main_average
        self.distill_mix = distill_mix
        self.tau = tau

    def terms(self, out: SSAOutput, target: Tensor) -> dict[str, Tensor]:
        target = self.checked_target(out, target)
        n = out.logits.shape[1]
        feature_target = out.feature_target
        if feature_target is None or feature_target.shape[-2:] != out.logits.shape[-2:]:
            feature_target = resize_labels_nearest(target, out.logits.shape[-2:])
        ce = {"ignore_index": self.ignore_index, "reduction": self.reduction, "align_corners": True}
        return {
            "ce": _ce(out.logits, target, average=self.main_average, **ce),
            "ce_coarse": _ce(out.coarse, target, **ce),
            "ce_teacher": _ce(out.teacher, target, **ce),
            "distill": boundary_distillation(
                out.logits, out.teacher, feature_target, n, ignore_index=self.ignore_index, mix=self.distill_mix
            ),
            "dice": sigmoid_dice_loss(out.logits, target, ignore_index=self.ignore_index),
            "dice_teacher": sigmoid_dice_loss(out.teacher, target, ignore_index=self.ignore_index),
            "relation": relation_distillation(out.semantic, out.semantic_teacher, self.tau),
            "position": position_distillation(out.position, out.position_teacher),
        }
