"""SSA-Seg's training terms (Ma et al., NeurIPS 2024), as the official code computes them."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Literal

from torch import Tensor

from .._types import Reduction
from .._validation import check_unit_interval
from ..functional import (
    boundary_distillation,
    position_distillation,
    relation_distillation,
    sigmoid_dice_losses,
)
from ..outputs import SSAOutput
from .base import HeadLoss, SharedTerms, feature_resolution_target

__all__ = ["SSALoss"]


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


class SSALoss(HeadLoss[SSAOutput]):
    """Every SSA-Seg training term, as the official code computes them; ``loss`` is their weighted sum.

    - ``ce``: CE of the SSA logits (main term), ``ce_coarse``: CE of the coarse mask, ``ce_teacher``: CE of the
      teacher (not detached — it trains the ``gt_*`` layers); all upsampled bilinearly with
      ``align_corners=True`` and averaged over valid pixels (``main_average="all"``: the official mmseg main
      term divides by all pixels);
    - ``distill``: :func:`~adaptive_heads.functional.boundary_distillation` (feature resolution);
    - ``dice`` / ``dice_teacher``: :func:`~adaptive_heads.functional.sigmoid_dice_loss` on student / teacher;
    - ``relation`` (×10): :func:`~adaptive_heads.functional.relation_distillation` of ``S_p`` toward ``S_p^T``;
    - ``position`` (×0.4): :func:`~adaptive_heads.functional.position_distillation` of ``P_p`` toward ``P_p^T``.

    The official sigmoid focal loss, computed and then discarded, is not computed. Everything is float32 and
    finite on all-ignored batches (the official code returns float64, and NaN there).

    Args:
        distill_mix: teacher share of the soft target of ``distill`` (official 0.5).
        relation_tau: scale of the relation matrices of ``relation`` (official 15, the head's ``tau``).
        ignore_index: label ignored by every term.
        weights: per-term weights, merged into the official ``default_weights``.
        reduction: ``"mean"`` or ``"sum"`` of the CE terms.
        main_average: denominator of the main CE ``ce``: ``"valid"`` pixels or ``"all"`` pixels (mmseg 0.x's).

    Example:
        >>> from adaptive_heads import SSAClassifier
        >>> head = SSAClassifier(16, 5)
        >>> feat, target = torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32))
        >>> loss_fn = SSALoss(weights={"relation": 0.0})  # switch one term off
        >>> loss_fn(head(feat, target), target)["loss"].backward()
    """

    default_weights = DEFAULT_WEIGHTS
    output_type = SSAOutput
    main_term = "ce"
    options = ("distill_mix", "relation_tau")

    def __init__(
        self,
        *,
        distill_mix: float = 0.5,
        relation_tau: float = 15.0,
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: Reduction = "mean",
        main_average: Literal["valid", "all"] = "valid",
    ) -> None:
        super().__init__(ignore_index=ignore_index, weights=weights, reduction=reduction, main_average=main_average)
        check_unit_interval("distill_mix", distill_mix)
        if relation_tau <= 0:
            raise ValueError(f"relation_tau must be positive, got {relation_tau}")
        self.distill_mix = distill_mix
        self.relation_tau = relation_tau

    def terms(self, out: SSAOutput, target: Tensor, skip: Container[str] = ()) -> dict[str, Tensor]:
        target, split = self.split_target(out, target)
        n = out.logits.shape[1]
        feature_target = feature_resolution_target(out.feature_target, target, out.logits)
        ce = {"ce": out.logits, "ce_coarse": out.coarse, "ce_teacher": out.teacher}  # all align_corners=True
        ces = self.cross_entropies({k: ce[k] for k in self.wanted(ce, skip)}, split, align_corners=True, main="ce")
        dice = {"dice": out.logits, "dice_teacher": out.teacher}
        dices = self._dices({k: dice[k] for k in self.wanted(dice, skip)}, split)
        return self.computed(
            {
                "ce": ces["ce"],
                "ce_coarse": ces["ce_coarse"],
                "ce_teacher": ces["ce_teacher"],
                "distill": lambda: boundary_distillation(
                    out.logits, out.teacher, feature_target, n, ignore_index=self.ignore_index, mix=self.distill_mix
                ),
                "dice": dices["dice"],
                "dice_teacher": dices["dice_teacher"],
                "relation": lambda: relation_distillation(out.semantic, out.semantic_teacher, self.relation_tau),
                "position": lambda: position_distillation(out.position, out.position_teacher),
            },
            skip,
        )

    def _dices(self, logits: Mapping[str, Tensor], split: tuple[Tensor, Tensor]) -> SharedTerms:
        """The dice terms of several logits against the :meth:`split_target` labels, in one pass
        (:func:`~adaptive_heads.functional.sigmoid_dice_losses`)."""
        names = list(logits)

        def compute() -> dict[str, Tensor]:
            values = sigmoid_dice_losses(list(logits.values()), split[0], valid=split[1])
            return dict(zip(names, values.unbind(), strict=True))

        return SharedTerms(compute)
