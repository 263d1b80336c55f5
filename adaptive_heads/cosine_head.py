"""``CosineHead``: the coarse classifier, cosine scale and label-built class statistics that CAC and
SSA-Seg share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._distributed import all_reduce_class_statistics
from ._types import LABEL_POOLINGS, ClassDirection, LabelPooling
from ._validation import check_choice, plain_option
from .functional import hard_class_pool, pointwise_conv
from .functional.cosine import cosine_logits_of
from .head import AdaptiveHead

__all__ = ["CosineHead"]


class CosineHead(AdaptiveHead):
    """Common part of the cosine-classifier heads (CAC, SSA-Seg): the coarse classifier ``conv_seg`` (1×1 as in the
    official code, or the k×k conv of the model it replaces; mmseg's init: N(0, ``init_std``²) weight, zero bias),
    ``Dropout2d`` on its input only, the scale ``tau``.

    A k×k coarse classifier (smp's ``Unet``, ``PSPNet``, ``PAN``, ``MAnet`` end in a 3×3 conv) keeps the model's
    coarse logits exactly; the projectors need one ``[n, C]`` class direction ``W`` per class, taken from the
    kernel by ``class_direction``: ``"sum"`` over its taps (the classifier's response to a spatially constant
    feature map) or its ``"centre"`` tap. For a 1×1 classifier both are its weight. ``"sum"`` is the default: the
    direction the classifier actually applies to a smooth feature map (how the two compared on CamVid: docs, CamVid
    experiment).

    Args:
        in_channels: C, channels of the decoder feature map.
        num_classes: n.
        teacher_pooling: where the label-built (teacher) branch pools its class statistics: ``"batch"``
            (official), ``"image"`` or ``"global"`` (see :meth:`label_class_statistics`).
        tau: cosine scale (official 15).
        dropout: ``Dropout2d`` probability before ``conv_seg`` (0 disables); ``None``: the official 0.1, or the rate
            of the host's dropout that :func:`~adaptive_heads.replace_classifier` absorbs (:meth:`take_input_dropout`).
        ignore_index: label ignored by the label-built branch (and default of the loss).
        eps: added to norms and soft areas (official 1e-12).
        init_std: std of the normal init of ``conv_seg.weight`` (mmseg's 0.01); bias 0.
        kernel_size: of ``conv_seg`` (odd; padded to keep the size): 1 (official) or the replaced classifier's.
        dilation: of ``conv_seg`` (the replaced classifier's).
        class_direction: ``"sum"`` or ``"centre"``, the class direction of a k×k ``conv_seg``.

    Example:
        >>> from adaptive_heads import ContextAwareClassifier
        >>> head = ContextAwareClassifier(16, 5, kernel_size=3, class_direction="centre")
        >>> head.conv_seg.kernel_size, head.classifier_weight.shape
        ((3, 3), torch.Size([5, 16]))
    """

    coarse_classifier = "conv_seg"
    #: heads unpickled from 0.2 keep their rate
    _default_dropout = False
    free_options = ("init_std",)

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
        super().__init__(in_channels, num_classes, ignore_index)
        teacher_pooling, tau, dropout, eps, init_std, kernel_size, dilation, class_direction = (
            plain_option(v) for v in (teacher_pooling, tau, dropout, eps, init_std, kernel_size, dilation,
                                      class_direction)
        )  # fmt: skip
        check_choice("teacher_pooling", teacher_pooling, LABEL_POOLINGS)
        check_choice("class_direction", class_direction, ("sum", "centre"))
        self.teacher_pooling = teacher_pooling
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.class_direction = class_direction
        #: the rate is the default one, which a host's dropout absorbed by replace_classifier replaces
        self._default_dropout = dropout is None
        dropout = 0.1 if dropout is None else dropout
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = float(tau)
        self.eps = float(eps)
        self.init_std = float(init_std)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(
            self.in_channels, self.num_classes, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation
        )
        self.reset_coarse_classifier()

    def reset_coarse_classifier(self) -> None:
        """``conv_seg``: ``N(0, init_std²)`` weight, zero bias (mmseg's ``init_cfg`` of a decode head's classifier)."""
        nn.init.normal_(self.conv_seg.weight, std=self.init_std)
        nn.init.zeros_(cast(Tensor, self.conv_seg.bias))

    def take_input_dropout(self, p: float) -> bool:
        """The host's dropout before the classifier becomes this head's ``Dropout2d(p)`` on the coarse path only
        (the official heads' place for it: the prototypes and the label-built branch see the undropped features);
        ``p = 0`` removes it. A head built with a ``dropout=`` rate keeps it. Returns ``True``."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        if self._default_dropout:
            self.dropout = nn.Dropout2d(p) if p > 0 else nn.Identity()
        return True

    def options(self) -> dict[str, Any]:
        conv = self.conv_seg
        return {
            **super().options(),
            "tau": self.tau,
            "dropout": float(self.dropout.p) if isinstance(self.dropout, nn.Dropout2d) else 0.0,
            "eps": self.eps,
            "kernel_size": conv.kernel_size[0],
            "dilation": conv.dilation[0],
            "class_direction": self.class_direction,
            "teacher_pooling": self.teacher_pooling,
        }

    @property
    def classifier_weight(self) -> Tensor:
        """The class directions ``W`` ``[n, C]`` the projectors fuse with the prototypes: ``conv_seg.weight`` of a
        1×1 classifier (a reshape, so C = 1 works); of a k×k one, the sum over its taps or its centre tap
        (``class_direction``)."""
        weight = self.conv_seg.weight
        if weight.shape[-2:] == (1, 1):
            return weight.reshape(self.num_classes, self.in_channels)
        if self.class_direction == "sum":
            return weight.sum(dim=(2, 3))
        return weight[:, :, weight.shape[2] // 2, weight.shape[3] // 2]

    def coarse_logits(self, feat: Tensor) -> Tensor:
        """``conv_seg(dropout(feat))`` ``[B, n, h, w]``; for a 1×1 classifier the dropout is folded into the weight
        (no feature copy)."""
        p = float(self.dropout.p) if self.training and isinstance(self.dropout, nn.Dropout2d) else 0.0
        conv = self.conv_seg
        if conv.kernel_size == (1, 1):
            return pointwise_conv(feat, conv.weight, conv.bias, p)
        return conv(F.dropout2d(feat, p) if p > 0 else feat)

    def context_weights(self, coarse: Tensor) -> Tensor:
        """The weight ``[B, n, ...]`` (float32) each pixel gives each class of the image's prototypes: the class
        softmax of the coarse logits ``coarse [B, n, ...]``, as the official heads. The one place that decides which
        pixels pool a class prototype (training, inference, sliding-window context): a subclass may override it
        (``examples/context_pooling.py`` tries two other poolings)."""
        return torch.softmax(coarse, dim=1, dtype=torch.float64 if coarse.dtype == torch.float64 else torch.float32)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # a checkpoint of the model from before replace_classifier holds the replaced conv's weight and bias
        # at this path: they are the coarse classifier's (what replace_classifier copies); the adaptive layers
        # are then reported missing, as for any checkpoint without them
        conv = prefix + "conv_seg."
        if prefix + "weight" in state_dict and conv + "weight" not in state_dict:
            weight = state_dict.pop(prefix + "weight")
            if weight.numel() == self.conv_seg.weight.numel():
                weight = weight.reshape(self.conv_seg.weight.shape)
            state_dict[conv + "weight"] = weight
            if prefix + "bias" in state_dict:
                state_dict[conv + "bias"] = state_dict.pop(prefix + "bias")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def adopt_classifier(self, conv: nn.Conv2d, copy_weights: bool = True) -> None:
        """Take the replaced classifier's geometry (kernel, padding, dilation, padding mode) and, with
        ``copy_weights``, its weight and bias: the coarse logits equal the model's original logits."""
        geometry = (conv.kernel_size, conv.padding, conv.dilation, conv.padding_mode)
        if geometry != (
            self.conv_seg.kernel_size,
            self.conv_seg.padding,
            self.conv_seg.dilation,
            self.conv_seg.padding_mode,
        ):
            old = self.conv_seg
            pair = cast(tuple[int, int], conv.kernel_size)
            self.conv_seg = nn.Conv2d(
                self.in_channels, self.num_classes, pair, padding=cast(tuple[int, int], conv.padding),
                dilation=cast(tuple[int, int], conv.dilation), padding_mode=conv.padding_mode,
            ).to(device=old.weight.device, dtype=old.weight.dtype)  # fmt: skip
        if copy_weights:
            bias = cast(Tensor, self.conv_seg.bias)
            with torch.no_grad():
                self.conv_seg.weight.copy_(conv.weight)
                if conv.bias is not None:
                    bias.copy_(conv.bias)
                else:
                    bias.zero_()

    def label_class_statistics(
        self,
        feat: Tensor,
        feature_target: Tensor,
        pooling: LabelPooling,
        one_hot: Tensor | None = None,
        counts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Class sums and pixel counts of ``feat [B, C, h, w]`` under ``feature_target [B, h, w]``.

        ``pooling``: ``"image"`` → ``[B, n, C]``, ``[B, n]``; ``"batch"`` → ``[n, C]``, ``[n]`` over this process's
        batch (what the official code does on each GPU); ``"global"`` → the same over every rank's batch, summed by
        one autograd-aware all-reduce of ``[n, C + 1]`` floats in forward and its adjoint in backward
        (``4·n·(C + 1)`` bytes each: 0.3 MB at n = 150, C = 512), so the label-built branch equals one process
        on the concatenated global batch. Without an initialised process group ``"global"`` is ``"batch"``.
        ``one_hot`` and ``counts`` (per image) share the labels' one-hot masks between poolings
        (:func:`~adaptive_heads.functional.hard_class_pool`).
        """
        sums, counts = hard_class_pool(
            feat, feature_target, self.num_classes, ignore_index=self.ignore_index, per_image=pooling == "image",
            one_hot=one_hot, counts=counts,
        )  # fmt: skip
        if pooling == "global":
            sums, counts = all_reduce_class_statistics(sums, counts)
        return sums, counts

    def _logits(self, feat: Tensor, classifiers: Sequence[Tensor] | Tensor) -> list[Tensor]:
        """Cosine logits of ``feat`` under each ``[B, n, C]`` (or batch-shared ``[n, C]``) classifier, or each of a
        ``[K, B, n, C]`` stack, in one product that shares the feature norm; in the head's output dtype."""
        dtype = self.output_dtype(feat)
        return [t.to(dtype) for t in cosine_logits_of(feat, classifiers, self.tau, eps=self.eps)]
