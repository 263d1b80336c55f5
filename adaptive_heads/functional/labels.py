"""Label maps: resizing as PyTorch's legacy ``nearest`` does, OpenCV's Canny, and SSA-Seg's boundary band."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["canny_edges", "label_boundary", "resize_labels_nearest", "valid_labels"]


def _nearest_source_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """Source indices of PyTorch's legacy ``nearest`` mode: ``min(floor(i · in/out), in - 1)`` in float32."""
    if out_size == in_size:
        return torch.arange(out_size, device=device)
    # the float32 scale of PyTorch's kernel, filled on the device (no host copy; traceable by torch.compile)
    scale = torch.full((), in_size / out_size, dtype=torch.float32, device=device)
    idx = torch.floor(torch.arange(out_size, dtype=torch.float32, device=device) * scale).long()
    return idx.clamp_max(in_size - 1)


def resize_labels_nearest(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Resize an integer label map like ``F.interpolate(labels.float(), size, mode="nearest")``.

    Legacy nearest takes the top-left sample of each block (source index ``floor(i·H/h)``) for
    downsampling — not a majority vote, not the block centre. Works on the integer tensor directly
    (no float copy, exact for any label value).

    Args:
        labels: ``[B, H, W]`` integer labels.
        size: ``(h, w)``.

    Returns:
        ``[B, h, w]`` labels, same dtype: a strided view of ``labels`` when ``H/h`` and ``W/w`` are integers.

    Example:
        >>> labels = torch.arange(16).view(1, 4, 4)
        >>> resize_labels_nearest(labels, (2, 2))  # the top-left sample of each 2×2 block
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    h, w = size
    big_h, big_w = labels.shape[-2:]
    if (big_h, big_w) == (h, w):
        return labels
    if big_h % h == 0 and big_w % w == 0:  # an integer factor: every (H/h)-th row and column, a view
        return labels[..., :: big_h // h, :: big_w // w]
    rows = _nearest_source_index(h, big_h, labels.device)
    cols = _nearest_source_index(w, big_w, labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


#: OpenCV's fixed-point tangent of 22.5°: ``round(tan(22.5°) · 2^15)``
_TG22 = 13573
_SHIFT = 15


def _sobel(image: Tensor) -> tuple[Tensor, Tensor]:
    """OpenCV's 3×3 Sobel ``dx``, ``dy`` of ``[B, h, w]`` with a replicated border, as ``int32``."""
    x = F.pad(image.to(torch.float32).unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    diff = torch.arange(-1.0, 2.0, device=image.device)  # [-1, 0, 1], built on the device (no host copy)
    smooth = 2.0 - diff.abs()  # [1, 2, 1]
    kx = (smooth.view(3, 1) * diff.view(1, 3)).view(1, 1, 3, 3)
    ky = kx.transpose(2, 3)
    # integer-valued sums below 2^11: exact in float32 (integer convolutions do not exist on every device)
    dx = F.conv2d(x, kx).squeeze(1).to(torch.int32)
    dy = F.conv2d(x, ky).squeeze(1).to(torch.int32)
    return dx, dy


def canny_edges(image: Tensor, low_threshold: float, high_threshold: float) -> Tensor:
    """``cv2.Canny(image, low_threshold, high_threshold)`` (aperture 3, L1 gradient) in torch, bit-identical.

    OpenCV's steps, each reproduced exactly: the thresholds are floored to integers (so 0.1 and 0.2 both become
    0); 3×3 Sobel gradients with a replicated border; magnitude ``|dx| + |dy|``; non-maximum suppression in four
    sectors chosen with OpenCV's fixed-point tan 22.5° test (``|dy|·2^15 < |dx|·13573``: horizontal, compared with
    the left neighbour strictly and the right one non-strictly; ``|dy|·2^15 > |dx|·(13573 + 2^16)``: vertical,
    strict above, non-strict below; otherwise the diagonal given by the signs of ``dx, dy``, strict on both
    sides), magnitudes outside the image counting as 0; a surviving pixel is strong above the high threshold and
    weak above the low one; hysteresis keeps the weak pixels 8-connected to a strong one.

    With both thresholds flooring to the same integer there are no weak pixels and no hysteresis: the computation
    is a fixed set of tensor ops, free of host synchronisation. Otherwise hysteresis grows the strong set by
    3×3 dilations until it stops changing, checking for that on the host once per 8 dilations.

    Args:
        image: ``[B, h, w]`` integer image with values in ``[0, 255]`` (a label map: see :func:`label_boundary`).
        low_threshold: as OpenCV's (the two thresholds are swapped if given in the wrong order).
        high_threshold: as OpenCV's.

    Returns:
        ``[B, h, w]`` bool edge map.

    Example:
        >>> labels = torch.zeros(1, 8, 8, dtype=torch.long)
        >>> labels[:, :, 4:] = 3
        >>> canny_edges(labels, 0.1, 0.2)[0, 0].int().tolist()  # the step is marked once, on its left side
        [0, 0, 0, 1, 0, 0, 0, 0]
    """
    low, high = sorted((math.floor(low_threshold), math.floor(high_threshold)))
    dx, dy = _sobel(image)
    ax, ay = dx.abs(), dy.abs()
    magnitude = ax + ay
    h, w = magnitude.shape[-2:]
    padded = F.pad(magnitude, (1, 1, 1, 1))  # outside the image: magnitude 0

    def neighbour(di: int, dj: int) -> Tensor:
        return padded[:, 1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    y = ay * (1 << _SHIFT)
    horizontal = y < ax * _TG22
    vertical = ~horizontal & (y > ax * (_TG22 + (1 << (_SHIFT + 1))))
    same_sign = (dx < 0) == (dy < 0)  # OpenCV: (dx ^ dy) >= 0
    m = magnitude
    keep_h = (m > neighbour(0, -1)) & (m >= neighbour(0, 1))
    keep_v = (m > neighbour(-1, 0)) & (m >= neighbour(1, 0))
    keep_d = torch.where(
        same_sign, (m > neighbour(-1, -1)) & (m > neighbour(1, 1)), (m > neighbour(-1, 1)) & (m > neighbour(1, -1))
    )
    survives = (m > low) & torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    edges = survives & (m > high)
    if low == high:
        return edges
    weak = survives & ~edges
    while True:
        before = edges
        for _ in range(8):
            edges = edges | (weak & F.max_pool2d(edges.unsqueeze(1).float(), 3, 1, 1).squeeze(1).bool())
        if torch.equal(edges, before):
            return edges


def label_boundary(labels: Tensor, *, border: int = 6, dilation: int = 3) -> Tensor:
    """SSA-Seg's boundary band of a label map: the official ``get_bd``, on the device.

    ``cv2.Canny(labels.astype(uint8), 0.1, 0.2)`` (:func:`canny_edges`, bit-identical; the ignore value 255 is
    just another grey level, and label values wrap modulo 256 as in the ``uint8`` cast), edges within ``border``
    pixels of the image border removed, then a ``dilation × dilation`` dilation. Maps of at most ``2·border``
    pixels in a dimension have an empty band (the official code crashes on them). Sync-free.

    Args:
        labels: ``[B, h, w]`` integer labels.

    Returns:
        ``[B, h, w]`` float mask in {0, 1}, same device.

    Example:
        >>> labels = torch.zeros(1, 16, 16, dtype=torch.long)
        >>> labels[:, :, 8:] = 1
        >>> band = label_boundary(labels)
        >>> band[0, 8].int().tolist()  # the step on row 8, dilated, away from the 6-px border
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
        >>> label_boundary(labels[:, :10, :10]).sum()  # maps of 12 px or less have no band
        tensor(0.)
    """
    h, w = labels.shape[-2:]
    edge = canny_edges(labels.remainder(256), 0.1, 0.2)
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


def valid_labels(target: Tensor, num_classes: int, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """``(safe, valid)``: the labels clamped into ``[0, n)`` (any class, for indexing), and which pixels count: those
    whose label was in range and is not ``ignore_index``.

    Example:
        >>> safe, valid = valid_labels(torch.tensor([[0, 2, 255, -1]]), 3, 255)
        >>> safe.tolist(), valid.tolist()
        ([[0, 2, 2, 0]], [[True, True, False, False]])
    """
    safe = target.clamp(0, num_classes - 1)
    valid = safe == target
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        valid &= target != ignore_index
    return safe, valid
