"""Losses of the prototype classifier (ProtoSeg): CE + pixel-prototype contrast (PPC) + distance (PPD)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .base import HeadLoss
from .functional import float32_math, upcast_half, upsampled_cross_entropy
from .protoseg import PrototypeOutput
from .validation import check_target

__all__ = ["PrototypeLoss", "prototype_contrast_loss", "prototype_distance_loss", "prototype_loss"]

DEFAULT_WEIGHTS = {"ce": 1.0, "ppc": 0.01, "ppd": 0.001}


def _gather_target(proto_logits: Tensor, proto_target: Tensor) -> tuple[Tensor, Tensor]:
    valid = proto_target >= 0
    safe = torch.where(valid, proto_target, torch.zeros_like(proto_target))
    return proto_logits.gather(1, safe.unsqueeze(1)).squeeze(1), valid


def prototype_contrast_loss(proto_logits: Tensor, proto_target: Tensor, temperature: float = 1.0) -> Tensor:
    """PPC: cross-entropy over all ``n·K`` prototype cosines, mean over valid pixels.

    ``ℓ_i = logsumexp_j(s_ij/T) − s_{i,t_i}/T``. The official code uses ``T = 1`` (the paper writes a
    temperature). Written with ``logsumexp`` so no ``[N, n·K]`` log-softmax is kept for backward.

    Args:
        proto_logits: ``[N, n·K]`` cosines.
        proto_target: ``[N]`` long, ``-1`` = ignored.
    """
    with float32_math(proto_logits.device):
        z = upcast_half(proto_logits) / temperature
        picked, valid = _gather_target(z, proto_target)
        per_pixel = (torch.logsumexp(z, dim=1) - picked) * valid
        return per_pixel.sum() / valid.sum().clamp_min(1)


def prototype_distance_loss(proto_logits: Tensor, proto_target: Tensor) -> Tensor:
    """PPD: ``mean_i (1 − cos(e_i, p_{t_i}))²`` over valid pixels (``proto_target >= 0``)."""
    with float32_math(proto_logits.device):
        picked, valid = _gather_target(upcast_half(proto_logits), proto_target)
        return ((1.0 - picked).pow(2) * valid).sum() / valid.sum().clamp_min(1)


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
    - ``ppc``: :func:`prototype_contrast_loss` at feature resolution (``ppc_temperature``, official 1);
    - ``ppd``: :func:`prototype_distance_loss` at feature resolution.

    All-ignored batches give finite zeros (the official code gives NaN).
    """

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
        merged = dict(DEFAULT_WEIGHTS)
        if weights:
            unknown = set(weights) - set(DEFAULT_WEIGHTS)
            if unknown:
                raise ValueError(f"unknown loss terms in weights: {sorted(unknown)}; known: {list(DEFAULT_WEIGHTS)}")
            merged.update(weights)
        super().__init__(merged, reduction)
        if ppc_temperature <= 0:
            raise ValueError(f"ppc_temperature must be positive, got {ppc_temperature}")
        self.ignore_index = ignore_index
        self.ppc_temperature = ppc_temperature
        self.class_weight: Tensor | None
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight))

    def terms(self, out: PrototypeOutput, target: Tensor) -> dict[str, Tensor]:
        if not isinstance(out, PrototypeOutput):
            raise TypeError(f"out must be a PrototypeOutput (from PrototypeClassifier), got {type(out).__name__}")
        n = out.logits.shape[1]
        target = check_target(
            target, batch_size=out.logits.shape[0], num_classes=n,
            ignore_index=self.ignore_index, device=out.logits.device,
        )  # fmt: skip
        if self.class_weight is not None and self.class_weight.shape != (n,):
            raise ValueError(f"class_weight must have shape [{n}], got {tuple(self.class_weight.shape)}")
        return {
            "ce": upsampled_cross_entropy(
                out.logits,
                target,
                ignore_index=self.ignore_index,
                align_corners=True,
                reduction=self.reduction,
                class_weight=self.class_weight,
            ),
            "ppc": prototype_contrast_loss(out.proto_logits, out.proto_target, self.ppc_temperature),
            "ppd": prototype_distance_loss(out.proto_logits, out.proto_target),
        }
