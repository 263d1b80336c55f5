"""HF transformers: adaptive heads inside ``*ForSemanticSegmentation`` models.

HF segmentation models compute their own cross-entropy inside ``forward(pixel_values, labels=...)`` and never
pass the labels to the classifier. :class:`AdaptiveSegmentationModel` swaps the classifier for an adaptive head
and, in training with labels, runs the model inside :func:`~adaptive_heads.supervise`, so
``model(pixel_values, labels=labels).loss`` is the model's own loss plus the head's extra terms::

    from transformers import SegformerForSemanticSegmentation
    from adaptive_heads import ContextAwareClassifier
    from adaptive_heads.integrations.hf import AdaptiveSegmentationModel

    model = AdaptiveSegmentationModel(SegformerForSemanticSegmentation(config), ContextAwareClassifier)
    out = model(pixel_values=images, labels=labels)   # out.loss includes the adaptive terms
    out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from ..base import AdaptiveHead, HeadLoss
from ..replace import replace_classifier
from ..supervise import supervise

__all__ = ["AdaptiveSegmentationModel"]


class AdaptiveSegmentationModel(nn.Module):
    """Wrap an HF semantic-segmentation model so its loss includes the adaptive heads' terms.

    Args:
        model: e.g. ``SegformerForSemanticSegmentation``, ``UperNetForSemanticSegmentation``, ``DPT...``, ``Beit...``.
        head_factory: ``(in_channels, num_classes) -> AdaptiveHead``; ``None`` if the model already has one.
        include_aux: also replace the auxiliary classifier (UperNet, BEiT, DPT).
        losses: loss module(s) for :func:`~adaptive_heads.supervise` (default: each head's ``default_loss()``).

    ``forward(pixel_values, labels=None, **kwargs)`` returns the model's output; in training with labels its
    ``loss`` is the model's loss plus ``sup.loss()`` (the extra terms: the model's own CE already covers each
    head's main term), and :attr:`last_losses` holds every named term (detached) for logging.
    """

    def __init__(
        self,
        model: nn.Module,
        head_factory: Callable[[int, int], AdaptiveHead] | None = None,
        *,
        include_aux: bool = False,
        losses: HeadLoss[Any] | Mapping[str, HeadLoss[Any]] | None = None,
    ) -> None:
        super().__init__()
        if head_factory is not None:
            replace_classifier(model, head_factory, include_aux=include_aux)
        if not any(isinstance(m, AdaptiveHead) for m in model.modules()):
            raise ValueError("the model has no adaptive head; pass head_factory=")
        self.model = model
        self.losses = losses
        self.last_losses: dict[str, Tensor] = {}

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None, **kwargs):
        if labels is None or not self.training:
            return self.model(pixel_values=pixel_values, labels=labels, **kwargs)
        with supervise(self.model, labels, self.losses) as sup:
            out = self.model(pixel_values=pixel_values, labels=labels, **kwargs)
            terms = sup.losses()
        self.last_losses = {k: v.detach() for k, v in terms.items()}
        out.loss = terms["loss"] if out.loss is None else out.loss + terms["loss"]
        return out
