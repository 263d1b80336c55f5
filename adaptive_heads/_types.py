"""The option types the heads and losses share."""

from __future__ import annotations

from typing import Literal

__all__ = ["LABEL_POOLINGS", "ClassDirection", "LabelPooling", "Reduction"]

Reduction = Literal["mean", "sum"]
#: where a head pools its label-built class statistics: over each image, this process's batch, every rank's batch
LabelPooling = Literal["batch", "image", "global"]
LABEL_POOLINGS: tuple[str, ...] = ("batch", "image", "global")
#: the ``[n, C]`` class direction of a k×k coarse classifier: the sum over its taps, or its centre tap
ClassDirection = Literal["sum", "centre"]
