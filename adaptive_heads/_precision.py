"""Precision helpers: float32 islands inside autocast regions and half-precision models."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["compute_dtype", "float32_math", "upcast_half"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _autocast_available(device_type: str) -> bool:
    try:
        return bool(torch.amp.is_autocast_available(device_type))
    except RuntimeError:  # a device type this build does not know
        return False


# asked once, eagerly: torch.compile before torch 2.5 cannot trace the query (a graph break at every head call)
_AUTOCAST_DEVICES = {t: _autocast_available(t) for t in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "meta")}


def float32_math(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``device``, so explicit float32 math stays float32 (a no-op where
    autocast is off, and on devices without autocast, e.g. ``meta``)."""
    available = _AUTOCAST_DEVICES.get(device.type)
    if available is None:
        available = _AUTOCAST_DEVICES[device.type] = _autocast_available(device.type)
    if not available or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()  # nothing to disable: no autocast node in compiled or exported graphs
    return torch.autocast(device_type=device.type, enabled=False)


def upcast_half(x: Tensor) -> Tensor:
    """Upcast half types to float32, leave float32/float64 alone (float64 is kept for gradcheck)."""
    return x.float() if x.dtype in HALF_DTYPES else x


def _autocast_dtype(device_type: str) -> torch.dtype:
    return torch.get_autocast_dtype(device_type)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the heads' per-pixel products of ``x``: its own half dtype, else the autocast dtype where
    autocast is on for its device (a float32 decoder under autocast: as the conv the heads replace), else its own.

    Example:
        >>> x = torch.randn(2, 3)
        >>> compute_dtype(x), compute_dtype(x.bfloat16())
        (torch.float32, torch.bfloat16)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     compute_dtype(x)
        torch.bfloat16
    """
    if x.dtype in HALF_DTYPES:
        return x.dtype
    available = _AUTOCAST_DEVICES.get(x.device.type)
    if available and torch.is_autocast_enabled(x.device.type):
        return _autocast_dtype(x.device.type)
    return x.dtype
