"""Label maps: resizing as PyTorch's legacy ``nearest`` does, and the boundary band of SSA-Seg's distillation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["label_boundary", "resize_labels_nearest"]


def _nearest_source_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """Source indices of PyTorch's legacy ``nearest`` mode: ``min(floor(i · in/out), in - 1)`` in float32."""
    if out_size == in_size:
        return torch.arange(out_size, device=device)
    scale = float(np.float32(in_size / out_size))  # the float32 scale of PyTorch's kernel, a host constant
    idx = torch.floor(torch.arange(out_size, dtype=torch.float32, device=device) * scale).long()
    return idx.clamp_max(in_size - 1)


def resize_labels_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize an integer label map like ``F.interpolate(labels.float(), size, mode="nearest")``.

    Legacy nearest takes the top-left sample of each block (source index ``floor(i·H/h)``) for
    downsampling — not a majority vote, not the block centre. Works on the integer tensor directly
    (no float copy, exact for any label value).

    Args:
        labels: ``[B, H, W]`` integer labels.
        size: ``(h, w)``.

    Returns:
        ``[B, h, w]`` labels, same dtype.
    """
    h, w = size
    if labels.shape[-2:] == (h, w):
        return labels
    rows = _nearest_source_index(h, labels.shape[-2], labels.device)
    cols = _nearest_source_index(w, labels.shape[-1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def label_boundary(labels: Tensor, *, border: int = 6, dilation: int = 3) -> Tensor:
    """Boundary band of a label map, computed on the device (the official code runs OpenCV Canny on the CPU).

    A pixel is an edge if its right or lower neighbour has another label (the ignore value counts as a label,
    as in the official ``uint8`` image). This is the pixel Canny's non-maximum suppression keeps on a step
    between two labels (the first of the two equal-magnitude pixels); diagonal steps are found through their
    horizontal and vertical components. Edges within ``border`` pixels of the image border are dropped and the
    rest is dilated with a ``dilation × dilation`` square, as the official code does. Maps smaller than
    ``2·border`` simply have no boundary pixels (the official code crashes on them).

    Args:
        labels: ``[B, h, w]`` integer labels.

    Returns:
        ``[B, h, w]`` float mask in {0, 1}, same device.
    """
    b, h, w = labels.shape
    edge = torch.zeros(b, h, w, dtype=torch.bool, device=labels.device)
    edge[:, :, :-1] |= labels[:, :, :-1] != labels[:, :, 1:]
    edge[:, :-1, :] |= labels[:, :-1, :] != labels[:, 1:, :]
    if border > 0:
        rows = torch.arange(h, device=labels.device)
        cols = torch.arange(w, device=labels.device)
        inner_r = (rows >= border) & (rows < h - border)
        inner_c = (cols >= border) & (cols < w - border)
        edge &= inner_r.view(1, h, 1) & inner_c.view(1, 1, w)
    band = edge.unsqueeze(1).float()
    if dilation > 1:
        band = F.max_pool2d(band, dilation, stride=1, padding=dilation // 2)
    return band[:, 0, :h, :w]
