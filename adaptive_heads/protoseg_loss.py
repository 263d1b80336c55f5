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


def _contrast_sums_from_stats(own: Tensor, lse: Tensor, proto_target: Tensor) -> tuple[Tensor, Tensor]:
    """PPC and PPD sums at T = 1 from ``own [N, K]`` and ``lse [N]`` (see :class:`PrototypeOutput`)."""
    keep = proto_target >= 0
    within = proto_target.clamp_min(0) % own.shape[1]
    picked = upcast_half(own).gather(1, within.unsqueeze(1)).squeeze(1)
    ppc = torch.where(keep, lse - picked, torch.zeros_like(picked)).sum()
    ppd = torch.where(keep, (1 - picked).pow(2), torch.zeros_like(picked)).sum()
    return ppc, ppd


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

    The ``[N, n·K]`` similarities are never kept for backward. At T = 1 PPC and PPD come from the per-pixel
    statistics the head's single chunked similarity pass already produced (``contrast_lse``, ``own_similarity``);
    other temperatures run their own chunked pass (:func:`~adaptive_heads.prototype_ops.prototype_contrast_sums`).

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
        if self.class_weight is not None and self.class_weight.device != out.logits.device:
            self.class_weight = self.class_weight.to(out.logits.device)  # once, not a copy per step
        with float32_math(out.embeddings.device):
            if self.ppc_temperature == 1.0 and out.contrast_lse is not None and out.own_similarity is not None:
                ppc_sum, ppd_sum = _contrast_sums_from_stats(out.own_similarity, out.contrast_lse, out.proto_target)
            else:
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
