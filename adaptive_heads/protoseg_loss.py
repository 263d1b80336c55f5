"""Losses of the prototype classifier (ProtoSeg): CE + pixel-prototype contrast (PPC) + distance (PPD)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .base import HeadLoss
from .functional import float32_math, upcast_half, upsampled_cross_entropy
from .protoseg import PrototypeOutput
from .prototype_ops import prototype_contrast_sums

__all__ = ["PrototypeLoss", "prototype_loss"]

DEFAULT_WEIGHTS = {"ce": 1.0, "ppc": 0.01, "ppd": 0.001}


def prototype_loss(
    out: PrototypeOutput,
    target: Tensor,
    *,
    ignore_index: int | None = 255,
    weights: Mapping[str, float] | None = None,
    reduction: str = "mean",
    ppc_temperature: float = 1.0,
    class_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """Functional form of :class:`PrototypeLoss`."""
    return PrototypeLoss(
        ignore_index=ignore_index,
        weights=weights,
        reduction=reduction,
        ppc_temperature=ppc_temperature,
        class_weight=class_weight,
    )(out, target)


class PrototypeLoss(HeadLoss):
    """ProtoSeg's ``PixelPrototypeCELoss``: ``ce + 0.01·ppc + 0.001·ppd``.

    - ``ce``: CE of the segmentation logits upsampled bilinearly (``align_corners=True``, as the official code)
      to the label size, mean over valid pixels (class-weighted mean with ``class_weight``, e.g. the official
      Cityscapes weights);
    - ``ppc``: pixel–prototype contrast, CE over all ``n·K`` prototype cosines,
      ``logsumexp_j(s_ij/T) − s_{i,t_i}/T``, mean over valid pixels at feature resolution
      (``ppc_temperature`` T, official 1 — the paper writes a temperature);
    - ``ppd``: pixel–prototype distance ``(1 − s_{i,t_i})²``, mean over valid pixels.

    PPC and PPD run in pixel chunks (:func:`~adaptive_heads.prototype_ops.prototype_contrast_sums`): the
    ``[N, n·K]`` similarities are never kept for backward.

    All-ignored batches give finite zeros (the official code gives NaN).
    """

    default_weights = DEFAULT_WEIGHTS
    output_type = PrototypeOutput
    main_term = "ce"

    def __init__(
        self,
        *,
        ignore_index: int | None = 255,
        weights: Mapping[str, float] | None = None,
        reduction: str = "mean",
        ppc_temperature: float = 1.0,
        class_weight: Tensor | None = None,
    ) -> None:
        super().__init__(weights, reduction, ignore_index)
        if ppc_temperature <= 0:
            raise ValueError(f"ppc_temperature must be positive, got {ppc_temperature}")
        self.ppc_temperature = ppc_temperature
        self.class_weight: Tensor | None
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight))

    def terms(self, out: PrototypeOutput, target: Tensor) -> dict[str, Tensor]:
        target = self.checked_target(out, target)
        n = out.logits.shape[1]
        if self.class_weight is not None and self.class_weight.shape != (n,):
            raise ValueError(f"class_weight must have shape [{n}], got {tuple(self.class_weight.shape)}")
        with float32_math(out.embeddings.device):
            emb = upcast_half(out.embeddings)
            ppc_sum, ppd_sum = prototype_contrast_sums(emb, out.prototypes, out.proto_target, self.ppc_temperature)
        count = (out.proto_target >= 0).sum().clamp_min(1)
        return {
            "ce": upsampled_cross_entropy(
                out.logits,
                target,
                ignore_index=self.ignore_index,
                align_corners=True,
                reduction=self.reduction,
                class_weight=self.class_weight,
            ),
            "ppc": ppc_sum / count,
            "ppd": ppd_sum / count,
        }
