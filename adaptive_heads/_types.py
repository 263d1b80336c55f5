"""The option types the heads and losses share."""

from __future__ import annotations

from typing import Literal

__all__ = ["CONTEXT_POOLINGS", "LABEL_POOLINGS", "ClassDirection", "ContextPooling", "LabelPooling", "Reduction"]

Reduction = Literal["mean", "sum"]
#: where a head pools its label-built class statistics: over each image, this process's batch, every rank's batch
LabelPooling = Literal["batch", "image", "global"]
LABEL_POOLINGS: tuple[str, ...] = ("batch", "image", "global")
#: the ``[n, C]`` class direction of a k×k coarse classifier: the sum over its taps, or its centre tap
ClassDirection = Literal["sum", "centre"]
#: how a cosine head weights each pixel when it pools the image's class prototypes from the coarse mask: by the
#: class softmax (official), by the class softmax at each pixel's predicted class only, or by that weight scaled
#: by the pixel's confidence (one minus its normalised entropy)
ContextPooling = Literal["soft", "predicted", "confident"]
CONTEXT_POOLINGS: tuple[str, ...] = ("soft", "predicted", "confident")
