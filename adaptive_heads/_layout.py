"""Memory-layout helpers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["is_channels_last"]


def is_channels_last(x: Tensor) -> bool:
    """A channels-last-strided ``[B, C, h, w]`` that is not also plain contiguous (``C = 1`` or ``h·w = 1``)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
