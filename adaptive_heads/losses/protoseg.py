"""ProtoSeg's training terms (Zhou et al., CVPR 2022): CE, pixel-prototype contrast and distance."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Literal

import torch
from torch import Tensor

from .._precision import float32_math, upcast_half
from .._types import Reduction
from ..functional import (
    prototype_contrast_from_stats,
    prototype_contrast_sums,
    upsampled_cross_entropy,
)
from ..outputs import PrototypeOutput
from .base import HeadLoss

__all__ = ["PrototypeLoss"]


DEFAULT_WEIGHTS = {"ce": 1.0, "ppc": 0.01, "ppd": 0.001}


class PrototypeLoss(HeadLoss[PrototypeOutput]):
    """ProtoSeg's ``PixelPrototypeCELoss``: ``ce + 0.01·ppc + 0.001·ppd``.

    - ``ce``: CE of the segmentation logits upsampled bilinearly (``align_corners=True``, as the official code)
      to the label size, mean over valid pixels (class-weighted mean with ``class_weight``, e.g. the official
      Cityscapes weights);
    - ``ppc``: pixel–prototype contrast, CE over all ``n·K`` prototype cosines,
      ``logsumexp_j(s_ij/T) − s_{i,t_i}/T``, mean over valid pixels at feature resolution
      (``ppc_temperature`` T, official 1 — the paper writes a temperature);
    - ``ppd``: pixel–prototype distance ``(1 − s_{i,t_i})²``, mean over valid pixels.

    The ``[N, n·K]`` similarities are never kept for backward. At T = 1 PPC and PPD come from the per-pixel
    statistics the head's single chunked similarity pass already produced (``contrast_lse``, ``own_similarity``);
    other temperatures run their own chunked pass (:func:`~adaptive_heads.functional.prototype_contrast_sums`).

    All-ignored batches give finite zeros (the official code gives NaN).

    Args:
        ppc_temperature: temperature T of PPC (official 1).
        class_weight: optional ``[n]`` CE class weights (moved to the logits' device once, at the first call).
        ignore_index: label ignored by every term.
        weights: per-term weights, merged into the official ``default_weights``.
        reduction: ``"mean"`` or ``"sum"`` of the CE terms.
        main_average: denominator of the main CE ``ce``: ``"valid"`` pixels or ``"all"`` pixels (mmseg 0.x's).

    Example:
        >>> from adaptive_heads import PrototypeClassifier
        >>> head = PrototypeClassifier(16, 5, num_prototypes=3)
        >>> feat, target = torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32))
        >>> terms = PrototypeLoss(ppc_temperature=0.1)(head(feat, target), target)
        >>> terms["loss"].backward()
    """

    default_weights = DEFAULT_WEIGHTS
    output_type = PrototypeOutput
    main_term = "ce"
    options = ("ppc_temperature",)

    def __init__(
        self,
        *,
        ppc_temperature: float = 1.0,
        class_weight: Tensor | None = None,
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: Reduction = "mean",
        main_average: Literal["valid", "all"] = "valid",
    ) -> None:
        super().__init__(ignore_index=ignore_index, weights=weights, reduction=reduction, main_average=main_average)
        if ppc_temperature <= 0:
            raise ValueError(f"ppc_temperature must be positive, got {ppc_temperature}")
        self.ppc_temperature = ppc_temperature
        self.class_weight: Tensor | None
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight))

    def terms(self, out: PrototypeOutput, target: Tensor, skip: Container[str] = ()) -> dict[str, Tensor]:
        target = self.checked_target(out, target)
        n = out.logits.shape[1]
        if self.class_weight is not None and self.class_weight.shape != (n,):
            raise ValueError(f"class_weight must have shape [{n}], got {tuple(self.class_weight.shape)}")
        if self.class_weight is not None and self.class_weight.device != out.logits.device:
            self.class_weight = self.class_weight.to(out.logits.device)  # once, not a copy per step
        contrast: list[Tensor] = []  # ppc and ppd come from one pass over the pixels, computed once if wanted

        def contrast_mean(index: int) -> Tensor:
            if not contrast:
                with float32_math(out.embeddings.device):
                    if self.ppc_temperature == 1.0 and out.contrast_lse is not None and out.own_similarity is not None:
                        sums = prototype_contrast_from_stats(out.own_similarity, out.contrast_lse, out.proto_target)
                    else:
                        emb = upcast_half(out.embeddings)
                        sums = prototype_contrast_sums(emb, out.prototypes, out.proto_target, self.ppc_temperature)
                count = (out.proto_target >= 0).sum().clamp_min(1)
                contrast.extend(total / count for total in sums)
            return contrast[index]

        return self.computed(
            {
                "ce": lambda: upsampled_cross_entropy(
                    out.logits,
                    target,
                    ignore_index=self.ignore_index,
                    align_corners=True,
                    average=self.main_average,
                    reduction=self.reduction,
                    class_weight=self.class_weight,
                ),
                "ppc": lambda: contrast_mean(0),
                "ppd": lambda: contrast_mean(1),
            },
            skip,
        )
