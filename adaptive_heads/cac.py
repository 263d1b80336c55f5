"""Context-aware classifier (CAC) — Tian et al., "Learning Context-aware Classifier for Semantic
Segmentation", AAAI 2023.

The static classifier ``W`` of a 1×1 conv is turned into one classifier per image: class prototypes are
soft-pooled from the features with the coarse prediction ``softmax(p)``, concatenated with ``W`` and
projected by a small MLP; the image is then classified by cosine similarity ×``tau``. During training an
oracle classifier is built the same way from the ground-truth masks and distilled into the estimated one.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor
from torch.nn.modules.module import _IncompatibleKeys

from ._checkpoint import load_prefixed_state_dict
from ._layers import prototype_mlp, stacked_mlps
from ._types import ClassDirection, LabelPooling
from .cosine_head import CosineHead
from .functional import class_means, resize_labels_nearest, soft_class_pool, soft_class_sums
from .losses import ContextAwareLoss
from .outputs import CACOutput

__all__ = ["ContextAwareClassifier"]


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

    Paper variants: ``teacher_pooling="image"`` pools the oracle prototypes per image (the paper's Eq. 1). The
    package calls the paper's oracle branch the *teacher*, as SSA-Seg does: the same option and term names
    (``teacher_pooling``, ``ce_teacher``) mean the same thing in both heads.

    Args:
        in_channels: C, channels of the decoder feature map.
        num_classes: n.
        teacher_pooling: ``"batch"`` (official: this process's batch), ``"image"`` (paper) or ``"global"`` (every
            rank's batch under ``torch.distributed``: the oracle of one process on the global batch; see
            :meth:`~adaptive_heads.cosine_head.CosineHead.label_class_statistics` for its cost).
        tau: cosine scale (official 15).
        dropout: ``Dropout2d`` probability on the coarse classifier's input only (0 disables); ``None``: the
            official 0.1, or the rate of the host's dropout that :func:`~adaptive_heads.replace_classifier` absorbs.
        ignore_index: label the label-built branch ignores (and the default of the loss).
        eps: added to norms and soft areas (official 1e-12).
        init_std: std of the normal init of ``conv_seg.weight`` (mmseg's 0.01); bias 0.
        kernel_size: of the coarse classifier ``conv_seg`` (odd; 1 officially, or the replaced classifier's).
        dilation: of ``conv_seg`` (the replaced classifier's).
        class_direction: ``"sum"`` or ``"centre"``: the ``[n, C]`` class direction of a k×k ``conv_seg``
            (:class:`~adaptive_heads.cosine_head.CosineHead`).

    Example:
        >>> head = ContextAwareClassifier(in_channels=16, num_classes=5)
        >>> feat, target = torch.randn(2, 16, 8, 8), torch.randint(0, 5, (2, 32, 32))
        >>> losses = head.default_loss()(head(feat, target), target)  # training: structured output + its loss
        >>> sorted(losses)
        ['ce', 'ce_coarse', 'ce_teacher', 'distill', 'loss']
        >>> head.eval()(feat).shape  # inference: logits, like the 1×1 conv it replaces
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
        self.proj = prototype_mlp(self.in_channels)
        self.apd_proj = prototype_mlp(self.in_channels)

    loss_type = ContextAwareLoss
    training_only = ("apd_proj",)

    def _statistics(self, feat: Tensor, coarse: Tensor, pixel_weight: Tensor | None = None) -> dict[str, Tensor]:
        probs = self.context_weights(coarse)
        if pixel_weight is not None:
            probs = probs * pixel_weight.to(probs.dtype)
        sums, area = soft_class_sums(probs, feat)
        return {"sums": sums, "area": area}

    def context_statistics(self, feat: Tensor, pixel_weight: Tensor | None = None) -> dict[str, Tensor]:
        """The image statistics the classifier is built from, additive over disjoint pixel sets (tiles).

        Args:
            feat: ``[B, C, h, w]`` features of an image or of one tile of it.
            pixel_weight: optional ``[B or 1, 1, h, w]`` weight of each pixel (``1/coverage`` for overlapping
                tiles, so every image pixel counts once).

        Returns:
            ``{"sums": [B, n, C], "area": [B, n]}``: soft class sums of the features under the pooling weights
            (``softmax(p)`` officially; :meth:`~CosineHead.context_weights`) and the soft areas (float32).
        """
        return self._statistics(feat, self.coarse_logits(feat), pixel_weight)

    @staticmethod
    def merge_context(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
        """The statistics of the union of two disjoint pixel sets."""
        return {key: first[key] + second[key] for key in first}

    def _classifiers(self, prototypes: Tensor, oracle: Tensor | None = None) -> Tensor:
        """The estimated per-image classifier ``A_p = proj([prototypes, W])`` ``[B, n, C]``
        (``post_refine_proto_v2``) and, given the oracle prototypes, the oracle classifier ``A_y =
        apd_proj([oracle, W])``: ``[K, B, n, C]``, the two projectors in one batched pass."""
        weight = self.classifier_weight.expand_as(prototypes)
        if oracle is None:
            return stacked_mlps([self.proj], [(prototypes, weight)])
        pairs = [(prototypes, weight), (oracle.expand_as(prototypes), weight)]
        return stacked_mlps([self.proj, self.apd_proj], pairs)

    def logits_from_context(self, feat: Tensor, context: dict[str, Tensor]) -> Tensor:
        """Classify ``feat [B, C, h, w]`` with the classifier built from ``context`` (of the whole image, say)."""
        prototypes = context["sums"] / (context["area"].unsqueeze(-1) + self.eps)  # [B, n, C], float32
        return self._logits(feat, self._classifiers(prototypes))[0]

    def _prototypes(self, feat: Tensor, coarse: Tensor) -> Tensor:
        """The per-image class prototypes ``[B, n, C]``: the features pooled with the coarse mask's softmax."""
        return soft_class_pool(self.context_weights(coarse), feat, eps=self.eps)

    def forward_logits(self, feat: Tensor) -> Tensor:
        prototypes = self._prototypes(feat, self.coarse_logits(feat))
        return self._logits(feat, self._classifiers(prototypes))[0]

    def oracle_prototypes(self, feat: Tensor, feature_target: Tensor) -> Tensor:
        """The label-built (oracle) prototypes: ``[n, C]`` (batch or global pooling) or ``[B, n, C]``; classes without
        pixels take the detached classifier row."""
        sums, counts = self.label_class_statistics(feat, feature_target, self.teacher_pooling)
        return class_means(sums, counts, self.classifier_weight.detach())

    def teacher_classifier(self, feat: Tensor, feature_target: Tensor) -> Tensor:
        """The label-built (oracle) classifier ``A_y`` from ground-truth masks: ``[n, C]`` (batch or global
        pooling) or ``[B, n, C]``."""
        oracle = self.oracle_prototypes(feat, feature_target)
        weight = self.classifier_weight.expand_as(oracle)
        return stacked_mlps([self.apd_proj], [(oracle, weight)])[0]

    def forward_train(self, feat: Tensor, target: Tensor) -> CACOutput:
        coarse = self.coarse_logits(feat)
        feature_target = resize_labels_nearest(target, feat.shape[-2:])
        classifiers = self._classifiers(self._prototypes(feat, coarse), self.oracle_prototypes(feat, feature_target))
        logits, teacher = self._logits(feat, classifiers)
        return CACOutput(logits=logits, coarse=coarse, teacher=teacher, feature_target=feature_target)

    def load_official_state_dict(
        self, state_dict: Mapping[str, Tensor], prefix: str | None = None, strict: bool = False
    ) -> _IncompatibleKeys:
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
