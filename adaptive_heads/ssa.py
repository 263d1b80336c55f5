"""Semantic and spatial adaptive classifier (SSA-Seg) — Ma et al., "Semantic and Spatial Adaptive Pixel-level
Classifier for Semantic Segmentation", NeurIPS 2024.

The fixed class weights ``W`` (the 1×1 conv) and a learned per-class position basis ``E`` are moved towards
each image's own class centres: a *semantic* centre (class-softmax, soft-area pooling of the features) and a
*spatial* centre (pixel-softmax pooling of depthwise-conv position features). Both are fused by small MLPs
and one cosine classifier scores ``feat + position features`` against ``center_proj(S_p + P_p)``. In
training an online teacher built from the labels supervises the student through multi-domain distillation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from ._checkpoint import load_prefixed_state_dict
from ._layers import prototype_mlp, stacked_linears, stacked_mlps
from ._precision import compute_dtype, float32_math, upcast_half
from ._types import ClassDirection, LabelPooling
from .cosine_head import CosineHead
from .functional import (
    class_means,
    class_sums,
    hard_class_pool,
    label_one_hot,
    resize_labels_nearest,
    soft_class_pool,
    soft_class_sums,
)
from .losses import SSALoss
from .outputs import SSAOutput

__all__ = ["SSAClassifier"]


class SSAClassifier(CosineHead):
    """Drop-in replacement for ``nn.Conv2d(in_channels, num_classes, 1)`` implementing SSA-Seg.

    ``head(feat)`` → ``[B, n, h, w]`` logits in ``[-tau, tau]``; ``head(feat, target)`` → :class:`SSAOutput`
    for :class:`~adaptive_heads.SSALoss`.

    Inference, as the official code:

    1. coarse mask ``M = conv_seg(feat)`` (bias included; dropout in training);
    2. position features ``P_f = get_feat_pos(feat)``, a depthwise 3×3 conv (content-conditioned, no coordinates);
    3. spatial centre: softmax of ``M`` over the **pixels** of each class pools ``P_f``;
       ``P_p = center_pos_proj([E, pooled])`` with ``E = center_pos.weight``;
    4. semantic centre: softmax of ``M`` over the **classes** pools ``feat`` (normalised by the soft area; other
       weights with ``context_pooling``);
       ``S_p = center_content_proj([pooled, W])``;
    5. logits ``= tau · cos(feat + P_f, center_proj(S_p + P_p))``.

    Training adds the online teacher: semantic GT centres pooled over the **whole batch** (absent classes fall
    back to the detached ``W`` row), spatial GT centres per image (absent classes: detached ``E`` row),
    ``gt_center_content_proj([G, W])``, ``gt_center_pos_proj([H, E])`` (note the concat orders), the same
    cosine with ``gt_center_proj``. ``teacher_pooling="image"`` pools the semantic GT centres per image.

    Teacher layers (``gt_*``) are training-only: :meth:`strip_training_layers` drops them for deployment.

    Args:
        in_channels: C.
        num_classes: n.
        teacher_pooling: ``"batch"`` (official: this process's batch), ``"image"`` or ``"global"`` (every
            rank's batch under ``torch.distributed``: the teacher of one process on the global batch; see
            :meth:`~adaptive_heads.cosine_head.CosineHead.label_class_statistics` for its cost). The spatial GT centres
            are per image in every mode.
        tau: cosine scale (official 15).
        dropout: ``Dropout2d`` probability on the coarse classifier's input only (official 0.1, 0 in the OCR
            head; 0 disables); ``None``: 0.1, or the rate of the host's dropout that
            :func:`~adaptive_heads.replace_classifier` absorbs.
        ignore_index: label the label-built branch ignores (and the default of the loss).
        eps: added to norms and soft areas (official 1e-12).
        init_std: std of the normal init of ``conv_seg.weight`` (mmseg's 0.01); bias 0.
        kernel_size: of the coarse classifier ``conv_seg`` (odd; 1 officially, or the replaced classifier's).
        dilation: of ``conv_seg`` (the replaced classifier's).
        class_direction: ``"sum"`` or ``"centre"``: the ``[n, C]`` class direction of a k×k ``conv_seg``
            (:class:`~adaptive_heads.cosine_head.CosineHead`).

    Example:
        >>> head = SSAClassifier(in_channels=16, num_classes=5)
        >>> feat, target = torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32))
        >>> losses = head.default_loss()(head(feat, target), target)
        >>> sorted(losses)
        ['ce', 'ce_coarse', 'ce_teacher', 'dice', 'dice_teacher', 'distill', 'loss', 'position', 'relation']
        >>> head.eval().strip_training_layers()(feat).shape
        torch.Size([2, 5, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        teacher_pooling: LabelPooling = "batch",
        tau: float = 15.0,
        dropout: float | None = None,
        ignore_index: int | None = 255,
        eps: float = 1e-12,
        init_std: float = 0.01,
        kernel_size: int = 1,
        dilation: int = 1,
        class_direction: ClassDirection = "sum",
    ) -> None:
        super().__init__(
            in_channels, num_classes, teacher_pooling=teacher_pooling, tau=tau, dropout=dropout,
            ignore_index=ignore_index, eps=eps, init_std=init_std, kernel_size=kernel_size, dilation=dilation,
            class_direction=class_direction,
        )  # fmt: skip
        c = self.in_channels
        self.get_feat_pos = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c)
        self.center_pos = nn.Embedding(self.num_classes, c)
        self.center_content_proj = prototype_mlp(c)
        self.center_pos_proj = prototype_mlp(c)
        self.center_proj = nn.Linear(c, c, bias=False)
        self.gt_center_content_proj = prototype_mlp(c)
        self.gt_center_pos_proj = prototype_mlp(c)
        self.gt_center_proj = nn.Linear(c, c, bias=False)

    loss_type = SSALoss
    training_only = ("gt_center_content_proj", "gt_center_pos_proj", "gt_center_proj")

    def _centres(self, feat: Tensor, coarse: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """The image's semantic and spatial centres ``[B, n, C]`` from the coarse mask."""
        logits = coarse.flatten(2)
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        pixel_softmax = torch.softmax(logits, dim=-1, dtype=dtype)  # spatial: one distribution per class over pixels
        class_softmax = self.context_weights(logits)  # semantic: a class posterior per pixel
        sem_center = soft_class_pool(class_softmax, feat, eps=self.eps)
        return sem_center, class_sums(pixel_softmax, pos.flatten(2))  # each class's pixel weights sum to 1

    def _prototypes(self, centres: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``[S_p, P_p]`` (and with the teacher's centres ``[S_p, P_p, S_p^T, P_p^T]``) ``[K, B, n, C]``:
        ``S_p = center_content_proj([semantic centre, W])``, ``P_p = center_pos_proj([E, spatial centre])``, the
        teacher's ``gt_center_content_proj([G, W])``, ``gt_center_pos_proj([H, E])`` (note the concat orders), the
        projectors in one batched pass."""
        sem_center, pos_center = centres
        weight = self.classifier_weight.expand_as(sem_center)
        basis = self.center_pos.weight.expand_as(sem_center)
        mlps = [self.center_content_proj, self.center_pos_proj]
        pairs = [(sem_center, weight), (basis, pos_center)]
        if teacher is not None:
            mlps += [self.gt_center_content_proj, self.gt_center_pos_proj]
            pairs += [(teacher[0].expand_as(sem_center), weight), (teacher[1], basis)]
        return stacked_mlps(mlps, pairs)

    def _classifiers(self, prototypes: Tensor) -> Tensor:
        """``center_proj(S_p + P_p)`` (and ``gt_center_proj(S_p^T + P_p^T)``): ``[K, B, n, C]``."""
        pairs = prototypes.unflatten(0, (-1, 2)).sum(dim=1)  # semantic + spatial, per branch
        linears = [self.center_proj, self.gt_center_proj][: pairs.shape[0]]
        return stacked_linears(linears, pairs)

    def _classify(self, feat: Tensor, pos: Tensor, centres: tuple[Tensor, Tensor]) -> Tensor:
        # without autograd the position map can absorb the features in place (one C×N map less)
        x = pos.add_(feat) if not torch.is_grad_enabled() else feat + pos
        return self._logits(x, self._classifiers(self._prototypes(centres)))[0]

    def forward_logits(self, feat: Tensor) -> Tensor:
        coarse = self.coarse_logits(feat)
        pos = self.get_feat_pos(feat)
        return self._classify(feat, pos, self._centres(feat, coarse, pos))

    def context_statistics(self, feat: Tensor, pixel_weight: Tensor | None = None) -> dict[str, Tensor]:
        """The image statistics the classifier is built from, mergeable over disjoint pixel sets (tiles).

        The semantic centre's soft class sums and areas (the class softmax, :meth:`~CosineHead.context_weights`), and
        the spatial centre's pixel-softmax pooling as a running log-sum-exp: per class the peak coarse logit ``m``,
        ``Σ_i w_i e^{M_i − m} P_i`` and ``Σ_i w_i e^{M_i − m}`` (:meth:`merge_context` rescales both to the common
        peak).

        Args:
            feat: ``[B, C, h, w]`` features of an image or of one tile of it.
            pixel_weight: optional ``[B or 1, 1, h, w]`` weight of each pixel (``1/coverage``).

        Returns:
            ``{"sem_sums": [B, n, C], "sem_area": [B, n], "pos_peak": [B, n], "pos_sums": [B, n, C],
            "pos_norm": [B, n]}`` (float32).
        """
        coarse = self.coarse_logits(feat)
        pos = self.get_feat_pos(feat)
        with float32_math(feat.device):
            logits = upcast_half(coarse).flatten(2)
            class_softmax = self.context_weights(logits)
            if pixel_weight is not None:
                # the peak over the pixels that count: a weight-0 pixel's logit above every counted one would
                # scale the counted ones' share to 0 (0/0 once merged), and it never enters the sums anyway
                weight = upcast_half(pixel_weight).flatten(2)
                logits = logits.masked_fill(weight == 0, float("-inf"))
                class_softmax = class_softmax * weight
            peak = logits.amax(dim=-1).clamp_min(torch.finfo(logits.dtype).min)  # finite when no pixel counts
            spatial = (logits - peak.unsqueeze(-1)).exp()
            if pixel_weight is not None:
                spatial = spatial * weight
        sem_sums, sem_area = soft_class_sums(class_softmax, feat)
        pos_sums, pos_norm = soft_class_sums(spatial, pos)
        return {
            "sem_sums": sem_sums,
            "sem_area": sem_area,
            "pos_peak": peak,
            "pos_sums": pos_sums,
            "pos_norm": pos_norm,
        }

    @staticmethod
    def merge_context(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
        """The statistics of the union of two disjoint pixel sets (log-sum-exp merge of the spatial part)."""
        peak = torch.maximum(first["pos_peak"], second["pos_peak"])
        scale_a, scale_b = (first["pos_peak"] - peak).exp(), (second["pos_peak"] - peak).exp()
        return {
            "sem_sums": first["sem_sums"] + second["sem_sums"],
            "sem_area": first["sem_area"] + second["sem_area"],
            "pos_peak": peak,
            "pos_sums": first["pos_sums"] * scale_a.unsqueeze(-1) + second["pos_sums"] * scale_b.unsqueeze(-1),
            "pos_norm": first["pos_norm"] * scale_a + second["pos_norm"] * scale_b,
        }

    def logits_from_context(self, feat: Tensor, context: dict[str, Tensor]) -> Tensor:
        """Classify ``feat [B, C, h, w]`` with the classifier built from ``context`` (of the whole image, say).

        The position features ``P_f`` are those of ``feat`` itself (a 3×3 depthwise conv: within one pixel of the
        border of a tile they see the tile's zero padding, not the neighbouring tile)."""
        sem_center = context["sem_sums"] / (context["sem_area"].unsqueeze(-1) + self.eps)
        pos_center = context["pos_sums"] / context["pos_norm"].unsqueeze(-1)
        return self._classify(feat, self.get_feat_pos(feat), (sem_center, pos_center))

    def teacher_centres(self, feat: Tensor, pos: Tensor, feature_target: Tensor) -> tuple[Tensor, Tensor]:
        """The online teacher's semantic centres (``[n, C]`` pooled over the batch officially, ``[B, n, C]`` per image)
        and spatial centres (``[B, n, C]``, per image) from ground-truth masks; classes without pixels take the
        detached ``W`` and ``E`` rows."""
        one_hot = label_one_hot(feature_target, self.num_classes, self.ignore_index, compute_dtype(feat))  # shared
        counts = one_hot.sum(dim=-1, dtype=torch.float64 if feat.dtype == torch.float64 else torch.float32)
        sums, pooled = self.label_class_statistics(feat, feature_target, self.teacher_pooling, one_hot, counts)
        sem_gt = class_means(sums, pooled, self.classifier_weight.detach())
        psums, _ = hard_class_pool(pos, feature_target, self.num_classes, one_hot=one_hot, counts=counts)
        return sem_gt, class_means(psums, counts, self.center_pos.weight.detach())

    def teacher_prototypes(self, feat: Tensor, pos: Tensor, feature_target: Tensor) -> tuple[Tensor, Tensor]:
        """Online-teacher prototypes ``S_p^T``, ``P_p^T`` ``[B, n, C]`` from ground-truth masks."""
        sem_gt, pos_gt = self.teacher_centres(feat, pos, feature_target)
        weight = self.classifier_weight.expand_as(pos_gt)
        basis = self.center_pos.weight.expand_as(pos_gt)
        pairs = [(sem_gt.expand_as(pos_gt), weight), (pos_gt, basis)]
        semantic, position = stacked_mlps([self.gt_center_content_proj, self.gt_center_pos_proj], pairs).unbind(0)
        return semantic, position

    def forward_train(self, feat: Tensor, target: Tensor) -> SSAOutput:
        coarse = self.coarse_logits(feat)
        pos = self.get_feat_pos(feat)
        feature_target = resize_labels_nearest(target, feat.shape[-2:])
        centres = self._centres(feat, coarse, pos)
        prototypes = self._prototypes(centres, self.teacher_centres(feat, pos, feature_target))
        logits, teacher = self._logits(feat + pos, self._classifiers(prototypes))
        # split, not unbind: in backward the teacher's pair (no gradient: detached in the losses) is one zero block
        semantic, position, teacher_pair = prototypes.split([1, 1, 2])
        semantic_t, position_t = teacher_pair.unbind(0)
        return SSAOutput(
            logits=logits,
            coarse=coarse,
            teacher=teacher,
            semantic=semantic.squeeze(0),
            semantic_teacher=semantic_t,
            position=position.squeeze(0),
            position_teacher=position_t,
            feature_target=feature_target,
        )

    def load_official_state_dict(
        self, state_dict: Mapping[str, Tensor], prefix: str | None = None, strict: bool = False
    ) -> _IncompatibleKeys:
        """Load the head weights from an official SSA-Seg (mmseg 0.x ``*_ssa`` head) checkpoint.

        Keys under ``decode_head.`` (OCRNet cascade: ``decode_head.1.``; DDP ``module.`` optional): ``conv_seg``,
        ``get_feat_pos``, ``center_pos``, ``center_content_proj``, ``center_pos_proj``, ``center_proj`` and the
        teacher's ``gt_*``. The unused ``ssa_loss.criterion.empty_weight`` buffer is skipped.

        Returns ``(missing_keys, unexpected_keys)`` like :meth:`torch.nn.Module.load_state_dict`.
        """
        return load_prefixed_state_dict(
            self,
            state_dict,
            prefix=prefix,
            candidates=("decode_head.", "decode_head.1.", ""),
            strict=strict,
            ignored=("ssa_loss.criterion.empty_weight",),
        )
