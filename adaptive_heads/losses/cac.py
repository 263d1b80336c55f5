"""CAC's training terms (Tian et al., AAAI 2023), as the official code computes them."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Literal

from torch import Tensor

from .._types import Reduction
from .._validation import check_choice, check_unit_interval
from ..functional import context_aware_distillation
from ..outputs import CACOutput
from .base import HeadLoss, feature_resolution_target

__all__ = ["ContextAwareLoss"]


DEFAULT_WEIGHTS = {"ce": 1.0, "ce_coarse": 1.0, "ce_teacher": 1.0, "distill": 1.0}


class ContextAwareLoss(HeadLoss[CACOutput]):
    """All CAC training terms, as the official code computes them.

    ``loss_fn(out, target)`` with ``out`` the :class:`~adaptive_heads.outputs.CACOutput` of
    ``head(feat, target)`` and ``target [B, H, W]`` returns:

    - ``ce``: CE of the context-aware logits ``p_p``, the logits the head returns (``align_corners=False``) —
      official main loss;
    - ``ce_coarse``: CE of the coarse logits ``p`` of ``conv_seg`` (bilinear upsampling with
      ``align_corners=True``, mean over valid pixels) — official ``PreSelfLoss``;
    - ``ce_teacher``: CE of the label-built (oracle) logits ``p_y`` (``align_corners=True``) — official ``PreLoss``;
    - ``distill``: :func:`context_aware_distillation` of ``p_y`` (detached) into ``p_p`` at feature resolution;
    - ``loss``: ``Σ weights[k]·term_k`` (all weights 1, as hard-coded officially).

    CE terms are means over non-ignored pixels. The official main term (mmseg 0.x) divided by *all*
    pixels; ``main_average="all"`` reproduces that. An all-ignored batch gives a finite 0.

    Args:
        distill_mode: ``"mixed"`` (official 0.5 label-mixed soft CE) or ``"kl"`` (paper).
        distill_mix: teacher share of the mixed target (official 0.5).
        class_average: ``"present"`` (official) or ``"all"`` (paper Eq. 11).
        ignore_index: label ignored by every term.
        weights: per-term weights, merged into the official ``default_weights``.
        reduction: ``"mean"`` or ``"sum"`` of the CE terms.
        main_average: denominator of the main CE ``ce``: ``"valid"`` pixels or ``"all"`` pixels (mmseg 0.x's).

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> head = ContextAwareClassifier(16, 5)
        >>> feat, target = torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32))
        >>> terms = ContextAwareLoss(distill_mode="kl")(head(feat, target), target)
        >>> terms["loss"].backward()
    """

    default_weights = DEFAULT_WEIGHTS
    output_type = CACOutput
    main_term = "ce"
    options = ("distill_mode", "distill_mix", "class_average")

    def __init__(
        self,
        *,
        distill_mode: Literal["mixed", "kl"] = "mixed",
        distill_mix: float = 0.5,
        class_average: Literal["present", "all"] = "present",
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: Reduction = "mean",
        main_average: Literal["valid", "all"] = "valid",
    ) -> None:
        super().__init__(ignore_index=ignore_index, weights=weights, reduction=reduction, main_average=main_average)
        check_choice("distill_mode", distill_mode, ("mixed", "kl"))
        check_choice("class_average", class_average, ("present", "all"))
        check_unit_interval("distill_mix", distill_mix)
        self.distill_mode = distill_mode
        self.distill_mix = distill_mix
        self.class_average = class_average

    def terms(self, out: CACOutput, target: Tensor, skip: Container[str] = ()) -> dict[str, Tensor]:
        target, split = self.split_target(out, target)
        n = out.logits.shape[1]
        feature_target = feature_resolution_target(out.feature_target, target, out.logits)
        pair = {"ce_coarse": out.coarse, "ce_teacher": out.teacher}  # both align_corners=True: one pass
        shared = self.cross_entropies({name: pair[name] for name in self.wanted(pair, skip)}, split, align_corners=True)
        return self.computed(
            {
                "ce": lambda: self.cross_entropy(out.logits, target, align_corners=False, average=self.main_average),
                "ce_coarse": shared["ce_coarse"],
                "ce_teacher": shared["ce_teacher"],
                "distill": lambda: context_aware_distillation(
                    out.logits,
                    out.teacher,
                    feature_target,
                    n,
                    ignore_index=self.ignore_index,
                    mix=self.distill_mix,
                    mode=self.distill_mode,
                    class_average=self.class_average,
                ),
            },
            skip,
        )
