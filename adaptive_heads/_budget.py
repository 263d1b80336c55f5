"""How much memory one temporary tensor of the heads may take: the tiles and chunks exist only where it is exceeded.

The label-resolution loss terms upsample logits to the label size (``[B, n, H, W]``: 1.2 GiB per 1024² image at
n = 150), ProtoSeg scores every pixel against every prototype (``[N, n·K]``). Each such computation runs in one pass
when its temporaries fit the budget of the device, and in row tiles (pixel chunks) of that size otherwise. One pass
is a fixed set of kernels whatever the image size; a tile loop launches the set once per tile.

- CPU: 64 MiB, tiles whose passes stay close to the caches, and a process whose peak memory stays flat whatever the
  image size;
- CUDA: a sixteenth of the device's memory (8.8 GiB on an H200, 1.5 GiB on a 24 GiB card), at least 512 MiB;
- other devices (MPS, XPU, and ``meta``, where operations are counted): 4 GiB.

:func:`set_memory_budget` overrides it per device type (or restores the default with ``None``).
"""

from __future__ import annotations

import torch

__all__ = ["memory_budget", "set_memory_budget"]

MIB = 1 << 20
_CPU = 64 * MIB
_OTHER = 4096 * MIB
_CUDA_FRACTION = 16
_CUDA_FLOOR = 512 * MIB

#: budgets set with :func:`set_memory_budget`, by device type
_OVERRIDES: dict[str, int] = {}
#: the default of each CUDA device, read once (its properties are host data: no synchronisation)
_CUDA: dict[int, int] = {}


def memory_budget(device: torch.device) -> int:
    """Bytes one temporary of the heads' label-resolution terms and ProtoSeg's similarities may take on ``device``
    before the computation is tiled (see the module docstring).

    Example:
        >>> memory_budget(torch.device("cpu")) // 2**20
        64
    """
    override = _OVERRIDES.get(device.type)
    if override is not None:
        return override
    if device.type == "cpu":
        return _CPU
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        budget = _CUDA.get(index)
        if budget is None:
            total = torch.cuda.get_device_properties(index).total_memory
            budget = _CUDA[index] = max(_CUDA_FLOOR, total // _CUDA_FRACTION)
        return budget
    return _OTHER


def set_memory_budget(nbytes: int | None, device_type: str = "cuda") -> None:
    """Set the bytes one temporary may take on every device of ``device_type`` (``"cuda"``, ``"cpu"``, ...);
    ``None`` restores the default. A smaller budget tiles more (less memory, more kernel launches), a larger one less.

    Example:
        >>> set_memory_budget(2**30, "cpu")
        >>> memory_budget(torch.device("cpu")) // 2**20
        1024
        >>> set_memory_budget(None, "cpu")  # the default again
    """
    if nbytes is None:
        _OVERRIDES.pop(device_type, None)
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes must be a positive int (or None for the default), got {nbytes!r}")
    _OVERRIDES[device_type] = nbytes
