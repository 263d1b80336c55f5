"""Input checks shared by every head and loss.

Shape, rank and dtype checks are free (metadata only) and always run. Value checks (label range, finite
features) need to read the tensor:

- CPU tensors: read at once (no sync cost there), a ``ValueError`` with the bad values;
- CUDA: the label range is asserted on the device (``torch._assert_async``: no host synchronisation; a bad
  label fails the step at a later kernel launch as a device-side assert, which ends the CUDA context);
- other accelerators (MPS, XPU, ROCm, which have no such assertion): not checked;
- debug mode (``adaptive_heads.set_debug(True)`` or ``ADAPTIVE_HEADS_DEBUG=1``) reads the labels on the host on
  every device, for the ``ValueError`` with the bad values;
- never while ``torch.compile``/``torch.export`` trace the code.

The finite-feature check also costs a full pass over the feature map, so it runs in debug mode only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_and_split_target",
    "check_choice",
    "check_features",
    "check_unit_interval",
    "is_tracing",
    "plain_option",
    "set_debug",
    "split_labels",
]

_DEBUG = os.environ.get("ADAPTIVE_HEADS_DEBUG", "0") not in ("", "0", "false", "False")


def set_debug(enabled: bool) -> None:
    """Turn the value checks on for accelerator tensors and the NaN/Inf feature check everywhere.

    Example:
        >>> from adaptive_heads import set_debug
        >>> set_debug(True)  # labels checked on accelerators too, NaN/Inf features rejected
        >>> set_debug(False)
    """
    global _DEBUG
    _DEBUG = bool(enabled)


def is_tracing() -> bool:
    """True while torch.compile / torch.export / TorchScript trace the code (value checks are skipped)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return torch.jit.is_scripting() or torch.jit.is_tracing()


def _value_checks(t: Tensor) -> bool:
    """Read the values on the host now (CPU, or debug mode)."""
    return not is_tracing() and (t.device.type == "cpu" or _DEBUG)


def _device_checks(t: Tensor) -> bool:
    """Assert on the device, without a host synchronisation: CUDA (``torch._assert_async`` has no kernel for MPS or
    XPU, and ROCm builds compile device asserts out) and ``meta`` (what the tests trace)."""
    return not is_tracing() and (t.device.type == "meta" or (t.device.type == "cuda" and torch.version.hip is None))


def plain_option(value: Any) -> Any:
    """A numpy scalar (``np.int64(3)``, ``np.float32(10)``, ``np.bool_(True)``, ``np.str_("x")``, common from
    configs and sweeps) or a 0-d tensor as the Python ``int``/``float``/``bool``/``str`` it holds, so that options
    compare, print and serialise (JSON) as the plain values; any other value unchanged (and checked by the caller).
    """
    if isinstance(value, Tensor):
        return value.item() if value.dim() == 0 and not value.is_complex() else value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        # a float16/float32 as the decimal it prints as (np.float32(0.9) is 0.9, not 0.8999999761581421)
        narrow_float = (
            getattr(value, "dtype", None) is not None and value.dtype.kind == "f" and value.dtype.itemsize < 8
        )
        value = float(str(value)) if narrow_float else value.item()
    for plain in (bool, int, float, str):  # subclasses (an IntEnum, np.float64) to the plain type
        if isinstance(value, plain):
            return plain(value)
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``: ``ValueError("name must be 'a' or 'b', got 'c'")`` otherwise."""
    if value not in choices:
        options = " or ".join(repr(c) for c in choices) if len(choices) <= 2 else f"one of {list(choices)}"
        raise ValueError(f"{name} must be {options}, got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    """``value`` must be a number in ``[0, 1]``: ``ValueError("name must be in [0, 1], got v")`` otherwise."""
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_features(feat: Tensor, in_channels: int, name: str = "feat") -> None:
    """``feat`` must be a floating ``[B, C, h, w]`` tensor with ``C == in_channels`` and ``B, h, w > 0``."""
    if not isinstance(feat, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, C, h, w], got {type(feat).__name__}")
    if feat.dim() != 4:
        raise ValueError(
            f"{name} must have shape [B, C, h, w] (4 dims), got {feat.dim()} dims with shape {tuple(feat.shape)}"
        )
    if not feat.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {feat.dtype}")
    if feat.shape[1] != in_channels:
        raise ValueError(
            f"{name} has {feat.shape[1]} channels but the head was built with in_channels={in_channels} "
            f"(shape {tuple(feat.shape)}, expected [B, {in_channels}, h, w])"
        )
    if feat.shape[0] == 0 or feat.shape[2] == 0 or feat.shape[3] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(feat.shape)}")
    if _DEBUG and not is_tracing() and not bool(torch.isfinite(feat).all()):
        raise ValueError(f"{name} contains NaN or Inf values (debug check)")


def split_labels(target: Tensor, num_classes: int, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """``(safe, valid)``: the labels clamped into ``[0, n)``, and the pixels whose label was in range and is not
    ``ignore_index`` (:func:`adaptive_heads.functional.valid_labels`)."""
    safe = target.clamp(0, num_classes - 1)
    valid = safe == target
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        valid &= target != ignore_index
    return safe, valid


def check_and_split_target(
    target: Tensor,
    *,
    batch_size: int,
    num_classes: int,
    ignore_index: int | None,
    device: torch.device | None = None,
    name: str = "target",
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Validate a label map: the map as ``[B, H, W]`` (a ``[B, 1, H, W]`` map is squeezed) and the
    :func:`split_labels` of it that reading its values computed on the way (``None`` where they were not read: while
    tracing, or on a device without asserts). Labels must be integers in ``[0, num_classes)`` or ``ignore_index``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, W], got {type(target).__name__}")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"{name} must have shape [B, H, W] (or [B, 1, H, W]), got shape {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got dtype {target.dtype}")
    if target.shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {target.shape[0]} but the features have batch size {batch_size}")
    if device is not None and target.device != device:
        raise ValueError(f"{name} is on {target.device} but the features are on {device}")
    if target.dtype != torch.long:
        target = target.long()
    if target.numel() == 0 or not (_value_checks(target) or _device_checks(target)):
        return target, None
    message = (
        f"{name} has labels outside [0, {num_classes}) that are not ignore_index={ignore_index}; if your "
        "ignore value is another one (-1, -100), pass it as ignore_index= to the head and its loss"
    )
    split = split_labels(target, num_classes, ignore_index)
    ok = split[1] if ignore_index is None else split[1] | (target == ignore_index)
    if _value_checks(target):
        if not bool(ok.all()):
            bad = target[~ok]
            raise ValueError(f"{message} (min {int(bad.min())}, max {int(bad.max())})")
    else:
        torch._assert_async(ok.all(), message)  # no sync: fails at a later kernel launch
    return target, split
