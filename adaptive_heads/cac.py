"""Context-aware classifier (CAC) — Tian et al., "Learning Context-aware Classifier for Semantic
Segmentation", AAAI 2023.

The static classifier ``W`` of a 1×1 conv is turned into one classifier per image: class prototypes are
soft-pooled from the features with the coarse prediction ``softmax(p)``, concatenated with ``W`` and
projected by a small MLP; the image is then classified by cosine similarity ×``tau``. During training an
oracle classifier is built the same way from the ground-truth masks and distilled into the estimated one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import CosineHead, HeadOutput
from .checkpoint import load_prefixed_state_dict
from .functional import (
    class_means,
    cosine_logits,
    float32_math,
    hard_class_pool,
    pointwise_conv,
    prototype_mlp,
    resize_labels_nearest,
    soft_class_pool,
    upcast_half,
)
from .validation import check_choice

__all__ = ["CACOutput", "ContextAwareClassifier"]


@dataclass
class CACOutput(HeadOutput):
    """Training output of :class:`ContextAwareClassifier`.

    Attributes:
        logits: ``p_p`` ``[B, n, h, w]``, the context-aware prediction (also the inference output).
        coarse: ``p`` ``[B, n, h, w]``, the plain 1×1-conv logits (with dropout, with bias).
        oracle: ``p_y`` ``[B, n, h, w]``, the oracle classifier's logits built from the labels.
        feature_target: ``[B, h, w]`` labels nearest-resized to the feature resolution.
    """

    coarse: Tensor
    oracle: Tensor
    feature_target: Tensor


class ContextAwareClassifier(CosineHead):
    """Drop-in replacement for ``nn.Conv2d(in_channels, num_classes, 1)`` implementing CAC.

    ``head(feat)`` with ``feat [B, C, h, w]`` returns the context-aware logits ``p_p [B, n, h, w]``
    (bounded by ±``tau``). ``head(feat, target)`` with ``target [B, H, W]`` (any H×W) returns a
    :class:`CACOutput` for :class:`~adaptive_heads.ContextAwareLoss`.

    Defaults reproduce the official code (``tianzhuotao/CAC``):

    - estimated prototypes are per image, pooled with the **un-detached** ``softmax(p)`` of the dropout-
      perturbed, biased logits over all pixels (ignored/padded ones too), from **un-normalised** features;
    - projector input is ``[prototypes, W]`` (in that order), ``W`` = ``conv_seg.weight`` with gradient;
      the projector is ``Linear(2C→C/2, no bias) → ReLU → Linear(C/2→C)``;
    - dropout (``Dropout2d``) applies only to the coarse logits ``p``; both branches use the raw features;
    - oracle prototypes are pooled over the **whole batch** from nearest-downsampled labels (legacy
      ``nearest``: top-left sample of each block); classes absent from the batch use the **detached**
      classifier row; one oracle classifier serves the whole batch;
    - cosine logits ×``tau`` with ``+eps`` on the norms (the official ASPP/OCR variants have no eps and
      give NaN on all-zero pixels; here an all-zero pixel gets logits 0).

    Paper variants: ``oracle_pooling="image"`` pools the oracle prototypes per image (the paper's Eq. 1).

    Args:
        in_channels: C, channels of the decoder feature map.
        num_classes: n.
        tau: cosine scale (official 15).
        dropout: ``Dropout2d`` probability before ``conv_seg`` (official 0.1; 0 disables).
        ignore_index: label ignored by the oracle pooling (and default of the loss).
        oracle_pooling: ``"batch"`` (official) or ``"image"`` (paper).
        eps: added to norms and soft areas (official 1e-12).
        init_std: std of the normal init of ``conv_seg.weight`` (mmseg's 0.01); bias 0.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        tau: float = 15.0,
        dropout: float = 0.1,
        ignore_index: int | None = 255,
        oracle_pooling: str = "batch",
        eps: float = 1e-12,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(
            in_channels, num_classes, tau=tau, dropout=dropout, ignore_index=ignore_index, eps=eps, init_std=init_std
        )
        check_choice("oracle_pooling", oracle_pooling, ("batch", "image"))
        self.oracle_pooling = oracle_pooling
        self.proj = prototype_mlp(in_channels)
        self.apd_proj = prototype_mlp(in_channels)

    def _context_logits(self, feat: Tensor, coarse: Tensor) -> Tensor:
        """Estimated per-image classifier → ``p_p [B, n, h, w]`` (``post_refine_proto_v2``)."""
        with float32_math(feat.device):
            probs = torch.softmax(upcast_half(coarse), dim=1)
        prototypes = soft_class_pool(probs, feat, eps=self.eps)  # [B, n, C], float32
        classifier = self._fuse(self.proj, prototypes, self.classifier_weight.expand_as(prototypes))  # [B, n, C]
        return cosine_logits(feat, classifier, self.tau, eps=self.eps).to(self.output_dtype(feat))

    def forward_logits(self, feat: Tensor) -> Tensor:
        coarse = pointwise_conv(feat, self.conv_seg, self._channel_dropout())
        return self._context_logits(feat, coarse)

    def oracle_classifier(self, feat: Tensor, feature_target: Tensor) -> Tensor:
        """Oracle classifier ``A_y`` from ground-truth masks: ``[n, C]`` (batch pooling) or ``[B, n, C]``."""
        per_image = self.oracle_pooling == "image"
        sums, counts = hard_class_pool(
            feat, feature_target, self.num_classes, ignore_index=self.ignore_index, per_image=per_image
        )
        weight = self.classifier_weight
        prototypes = class_means(sums, counts, weight.detach())
        return self._fuse(self.apd_proj, prototypes, weight.expand_as(sums))

    def forward_train(self, feat: Tensor, target: Tensor) -> CACOutput:
        coarse = pointwise_conv(feat, self.conv_seg, self._channel_dropout())
        logits = self._context_logits(feat, coarse)
        feature_target = resize_labels_nearest(target, feat.shape[-2:])
        oracle = cosine_logits(feat, self.oracle_classifier(feat, feature_target), self.tau, eps=self.eps)
        oracle = oracle.to(logits.dtype)
        return CACOutput(logits=logits, coarse=coarse, oracle=oracle, feature_target=feature_target)

    def default_loss(self):
        from .cac_loss import ContextAwareLoss

        return ContextAwareLoss(num_classes=self.num_classes, ignore_index=self.ignore_index)

    def strip_oracle(self) -> ContextAwareClassifier:
        """Drop the training-only oracle projector ``apd_proj`` (inference output is unchanged)."""
        self.apd_proj = None  # type: ignore[assignment]
        return self

    def load_official_state_dict(
        self, state_dict: Mapping[str, Tensor], prefix: str | None = None, strict: bool = False
    ):
        """Load the head weights from an official CAC (mmseg 0.x) checkpoint.

        Args:
            state_dict: the checkpoint's ``state_dict`` (or the whole checkpoint dict with a
                ``"state_dict"`` entry). Keys such as ``decode_head.conv_seg.weight``,
                ``decode_head.proj.0.weight``, ``decode_head.apd_proj.2.bias``.
            prefix: the head's prefix; ``None`` tries ``decode_head.``, ``decode_head.1.`` (OCRNet cascade),
                with or without a leading ``module.``, and no prefix.
            strict: raise if a head key is missing.

        Returns:
            ``(missing_keys, unexpected_keys)`` like :meth:`torch.nn.Module.load_state_dict`;
            ``unexpected_keys`` lists the keys under the prefix that this head does not have.
        """
        return load_prefixed_state_dict(
            self,
            state_dict,
            prefix=prefix,
            candidates=("decode_head.", "decode_head.1.", ""),
            strict=strict,
        )
