"""The CamVid robustness experiment's pooling variants: CAC and SSA-Seg whose class prototypes are pooled from other
pixels than the official heads' (not in the papers; docs/camvid.md, "Adaptation that survives new scenes").

The library's cosine heads weigh every pixel of an image by the class softmax of the coarse mask when they pool its
class prototypes (:meth:`adaptive_heads.cosine_head.CosineHead.context_weights`). A subclass that overrides that one
method changes the pooling everywhere it is used (training, inference, sliding-window context). Two variants were
tried, trained and evaluated on unseen sequences:

- ``"predicted"``: the class softmax kept at each pixel's predicted class only (:func:`predicted_class_weights`);
- ``"confident"``: that weight times the pixel's confidence, one minus its normalised entropy
  (:func:`confident_class_weights`).

Neither beat the official pooling (``"soft"``) on both unseen sequences for either head, so the library keeps the
official pooling and these variants live here, where ``train_camvid.py --head-options '{"context_pooling":
"predicted"}'`` and ``camvid_robust.py`` build them (:func:`pooled_head`).

Example:
    >>> from adaptive_heads import ContextAwareClassifier
    >>> head = pooled_head(ContextAwareClassifier, "confident")(8, 5)
    >>> type(head).__name__, head.context_pooling
    ('ConfidentContextAwareClassifier', 'confident')
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from adaptive_heads.cosine_head import CosineHead

__all__ = ["POOLINGS", "ContextPooling", "confident_class_weights", "pooled_head", "predicted_class_weights"]

#: the pooling of the official heads and the two variants tried
POOLINGS = ("soft", "predicted", "confident")


def predicted_class_weights(probs: Tensor) -> Tensor:
    """Class weights kept only at each pixel's predicted class: ``probs · 1[k = argmax_j probs_j]``.

    A class prototype pooled with these weights comes from the pixels the coarse mask assigns to that class, not
    from the probability it spreads over other classes' pixels (ties keep every tied class).

    Args:
        probs: ``[B, n, ...]`` class probabilities (class axis 1).

    Returns:
        ``[B, n, ...]``, same dtype; gradients flow through the kept entries.

    Example:
        >>> probs = torch.tensor([[[0.7, 0.4], [0.3, 0.6]]])  # [B=1, n=2, N=2]
        >>> predicted_class_weights(probs)
        tensor([[[0.7000, 0.0000],
                 [0.0000, 0.6000]]])
    """
    return probs * (probs == probs.amax(dim=1, keepdim=True))


def confident_class_weights(probs: Tensor) -> Tensor:
    """Class weights kept at each pixel's predicted class and scaled by how sure the pixel is:
    ``probs · 1[k = argmax_j probs_j] · (1 − H(probs) / log n)``.

    ``H`` is the entropy of the pixel's class distribution: a pixel the coarse mask is sure of keeps its weight, a
    pixel spread evenly over the ``n`` classes gives none. The factor is a gate, not a target: computed in float32
    and detached, so gradients flow through the kept ``probs`` only. With ``n = 1`` it is 1.

    Args:
        probs: ``[B, n, ...]`` class probabilities (class axis 1, each pixel summing to 1).

    Returns:
        ``[B, n, ...]``, same dtype.

    Example:
        >>> probs = torch.tensor([[[1.0, 0.5], [0.0, 0.5]]])  # [B=1, n=2, N=2]: one sure pixel, one even pixel
        >>> confident_class_weights(probs)
        tensor([[[1., 0.],
                 [0., 0.]]])
    """
    kept = predicted_class_weights(probs)
    num_classes = probs.shape[1]
    if num_classes == 1:
        return kept
    with torch.no_grad():
        wide = probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs
        entropy = -torch.special.xlogy(wide, wide).sum(dim=1, keepdim=True)
        confidence = (1 - entropy / math.log(num_classes)).clamp_(0, 1)
    return kept * confidence.to(probs.dtype)


_WEIGHTS = {"predicted": predicted_class_weights, "confident": confident_class_weights}


class ContextPooling:
    """Mixin for a :class:`~adaptive_heads.cosine_head.CosineHead`: its prototypes pooled with the weights of
    :attr:`context_pooling` (``"soft"``: the head's own). An attribute, so an evaluation can switch a trained head's
    pooling (``camvid_robust.py``)."""

    context_pooling: str = "soft"

    def context_weights(self, coarse: Tensor) -> Tensor:
        probs = super().context_weights(coarse)  # type: ignore[misc]
        weights = _WEIGHTS.get(self.context_pooling)
        return probs if weights is None else weights(probs)


@functools.cache
def pooled_head(head: type[CosineHead], pooling: str) -> type[CosineHead]:
    """``head`` (``ContextAwareClassifier`` or ``SSAClassifier``) pooling its prototypes with ``pooling``, one of
    :data:`POOLINGS`: a subclass whose instances can switch pooling (with ``"soft"`` it computes what ``head`` does)."""
    if pooling not in POOLINGS:
        raise ValueError(f"context_pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    return type(f"{pooling.capitalize()}{head.__name__}", (ContextPooling, head), {"context_pooling": pooling})
