"""Losses of the context-aware classifier (CAC)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .base import HeadLoss
from .cac import CACOutput
from .functional import (
    classwise_weighted_mean,
    float32_math,
    resize_labels_nearest,
    soft_distillation,
    upsampled_cross_entropy,
)
from .validation import check_choice

__all__ = ["ContextAwareLoss", "context_aware_distillation", "context_aware_loss"]

DEFAULT_WEIGHTS = {"ce": 1.0, "ce_context": 1.0, "ce_oracle": 1.0, "distill": 1.0}


def context_aware_distillation(
    student: Tensor,
    teacher: Tensor,
    feature_target: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    mix: float = 0.5,
    mode: str = "mixed",
    class_average: str = "present",
    eps: float = 1e-12,
) -> Tensor:
    """Entropy-weighted, class-balanced distillation of ``teacher`` into ``student`` (feature resolution).

    Per pixel: :func:`~adaptive_heads.functional.soft_distillation` (``mode="mixed"``: the official soft CE
    against ``mix·softmax(teacher) + (1-mix)·onehot``; ``mode="kl"``: the paper's KL). Each pixel is
    weighted by the teacher entropy ``H(q)`` (zero on ignored pixels) and the result is averaged per class,
    then over the classes present in ``feature_target`` (``class_average="present"``, official) or over all n
    (``"all"``, paper Eq. 11). See
    :func:`~adaptive_heads.functional.classwise_weighted_mean`.

    Args:
        student: ``[B, n, h, w]`` logits (receive gradient).
        teacher: ``[B, n, h, w]`` logits (detached here).
        feature_target: ``[B, h, w]`` labels at the logits' resolution.

    Returns:
        A scalar; 0 when no pixel is valid.
    """
    per_pixel, entropy, _ = soft_distillation(
        student, teacher, feature_target, ignore_index=ignore_index, mix=mix, mode=mode
    )
    with float32_math(student.device):
        return classwise_weighted_mean(
            per_pixel,
            entropy,
            feature_target,
            num_classes,
            ignore_index=ignore_index,
            average=class_average,
            eps=eps,
        )


def context_aware_loss(
    out: CACOutput,
    target: Tensor,
    *,
    ignore_index: int | None = 255,
    weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    main_average: str = "valid",
    distill_mode: str = "mixed",
    distill_mix: float = 0.5,
    class_average: str = "present",
) -> dict[str, Tensor]:
    """Functional form of :class:`ContextAwareLoss`; returns the named terms and ``"loss"``."""
    return ContextAwareLoss(
        ignore_index=ignore_index,
        weights=weights,
        reduction=reduction,
        main_average=main_average,
        distill_mode=distill_mode,
        distill_mix=distill_mix,
        class_average=class_average,
    )(out, target)


class ContextAwareLoss(HeadLoss):
    """All CAC training terms, as the official code computes them.

    ``loss_fn(out, target)`` with ``out`` the :class:`~adaptive_heads.cac.CACOutput` of
    ``head(feat, target)`` and ``target [B, H, W]`` returns:

    - ``ce``: CE of the plain logits ``p`` (bilinear upsampling with ``align_corners=True``, mean over valid
      pixels) — official ``PreSelfLoss``;
    - ``ce_context``: CE of the context-aware logits ``p_p`` (``align_corners=False``) — official main loss;
    - ``ce_oracle``: CE of the oracle logits ``p_y`` (``align_corners=True``) — official ``PreLoss``;
    - ``distill``: :func:`context_aware_distillation` of ``p_y`` (detached) into ``p_p`` at feature resolution;
    - ``loss``: ``Σ weights[k]·term_k`` (all weights 1, as hard-coded officially).

    CE terms are means over non-ignored pixels. The official main term (mmseg 0.x) divided by *all*
    pixels; ``main_average="all"`` reproduces that. An all-ignored batch gives a finite 0.

    Args:
        num_classes: only needed when the output does not carry it (kept for symmetry; optional).
        ignore_index: ignored label (default 255).
        weights: per-term weights, merged into the defaults.
        reduction: ``"mean"`` or ``"sum"`` for the CE terms (the distillation is class-balanced).
        main_average: ``"valid"`` or ``"all"`` denominator of ``ce_context``.
        distill_mode: ``"mixed"`` (official 0.5 label-mixed soft CE) or ``"kl"`` (paper).
        distill_mix: teacher share of the mixed target (official 0.5).
        class_average: ``"present"`` (official) or ``"all"`` (paper Eq. 11).
    """

    default_weights = DEFAULT_WEIGHTS
    output_type = CACOutput
    main_term = "ce_context"

    def __init__(
        self,
        num_classes: int | None = None,
        *,
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        main_average: str = "valid",
        distill_mode: str = "mixed",
        distill_mix: float = 0.5,
        class_average: str = "present",
    ) -> None:
        super().__init__(weights, reduction, ignore_index)
        check_choice("main_average", main_average, ("valid", "all"))
        check_choice("distill_mode", distill_mode, ("mixed", "kl"))
        check_choice("class_average", class_average, ("present", "all"))
        if not 0.0 <= distill_mix <= 1.0:
            raise ValueError(f"distill_mix must be in [0, 1], got {distill_mix}")
        self.num_classes = num_classes
        self.main_average = main_average
        self.distill_mode = distill_mode
        self.distill_mix = distill_mix
        self.class_average = class_average

    def terms(self, out: CACOutput, target: Tensor) -> dict[str, Tensor]:
        target = self.checked_target(out, target)
        n = out.logits.shape[1]
        ce_kwargs = {"ignore_index": self.ignore_index, "reduction": self.reduction}
        feature_target = out.feature_target
        if feature_target is None or feature_target.shape[-2:] != out.logits.shape[-2:]:
            feature_target = resize_labels_nearest(target, out.logits.shape[-2:])
        return {
            "ce": upsampled_cross_entropy(out.coarse, target, align_corners=True, **ce_kwargs),
            "ce_context": upsampled_cross_entropy(
                out.logits, target, align_corners=False, average=self.main_average, **ce_kwargs
            ),
            "ce_oracle": upsampled_cross_entropy(out.oracle, target, align_corners=True, **ce_kwargs),
            "distill": context_aware_distillation(
                out.logits,
                out.oracle,
                feature_target,
                n,
                ignore_index=self.ignore_index,
                mix=self.distill_mix,
                mode=self.distill_mode,
                class_average=self.class_average,
            ),
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, ignore_index={self.ignore_index}, main_average={self.main_average!r}, "
            f"distill_mode={self.distill_mode!r}, distill_mix={self.distill_mix}, "
            f"class_average={self.class_average!r}"
        )
