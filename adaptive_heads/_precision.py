"""Precision helpers: float32 islands inside autocast regions and half-precision models."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["float32_math", "upcast_half"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32_math(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``device``, so explicit float32 math stays float32 (a no-op on devices
    without autocast, e.g. ``meta``)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def upcast_half(x: Tensor) -> Tensor:
    """Upcast half types to float32, leave float32/float64 alone (float64 is kept for gradcheck)."""
    return x.float() if x.dtype in HALF_DTYPES else x
