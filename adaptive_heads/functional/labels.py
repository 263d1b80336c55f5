"""Label maps: resizing as PyTorch's legacy ``nearest`` does, OpenCV's Canny, and SSA-Seg's boundary band."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import split_labels

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

#: the neighbours non-maximum suppression compares a pixel with, per sector (row, column offsets) and whether the
#: comparison is strict: horizontal (left strictly, right), vertical (above strictly, below), the diagonal of
#: same-sign gradients, the other diagonal
_NEIGHBOURS = (((0, -1), True), ((0, 1), False), ((-1, 0), True), ((1, 0), False),
               ((-1, -1), True), ((1, 1), True), ((-1, 1), True), ((1, -1), True))  # fmt: skip

#: the constant kernels of :func:`canny_edges`, per (device, dtype): made once (a host-to-device copy on CUDA)
_KERNELS: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _canny_kernels(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sobel [2, 1, 3, 3], mix [3, 2, 1, 1], nms [8, 1, 3, 3], nms_bias [8])``: OpenCV's Sobel ``dx, dy``; from
    ``(|dx|, |dy|)`` the magnitude and the two sector tests ``2^15·|dy| − 13573·|dx|`` (horizontal below 0) and
    ``2^15·|dy| − (13573 + 2^16)·|dx|`` (vertical above 0); the magnitude minus each neighbour's of
    :data:`_NEIGHBOURS`, plus 1 where the comparison is not strict (integers: ``a ≥ b ⟺ a − b + 1 > 0``)."""
    key = (device, dtype)
    if key not in _KERNELS:
        dx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
        sobel = [[dx], [[list(row) for row in zip(*dx, strict=True)]]]
        mix = [[[[1]], [[1]]], [[[-_TG22]], [[1 << _SHIFT]]], [[[-(_TG22 + (1 << (_SHIFT + 1)))]], [[1 << _SHIFT]]]]
        nms = []
        for (di, dj), _ in _NEIGHBOURS:
            kernel = [[0.0] * 3 for _ in range(3)]
            kernel[1][1] += 1.0
            kernel[1 + di][1 + dj] -= 1.0
            nms.append([kernel])
        bias = [0.0 if strict else 1.0 for _, strict in _NEIGHBOURS]
        _KERNELS[key] = tuple(torch.tensor(t, dtype=dtype, device=device) for t in (sobel, mix, nms, bias))  # type: ignore[assignment]
    return _KERNELS[key]


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
    # float64 holds every value below exactly (Sobel sums below 2^11, the sector tests below 2^29)
    sobel, mix, nms, nms_bias = _canny_kernels(image.device, torch.float64)
    padded = F.pad(image.to(torch.float64).unsqueeze(1), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, sobel)  # [B, 2, h, w]: dx, dy
    tests = F.conv2d(grad.abs(), mix)  # [B, 3, h, w]: |dx| + |dy|, the horizontal and the vertical sector test
    magnitude = tests[:, :1]
    keep = F.conv2d(magnitude, nms, nms_bias, padding=1) > 0  # outside the image: magnitude 0
    keep = keep.unflatten(1, (4, 2)).all(dim=2)  # [B, 4, h, w]: a maximum in each sector's direction
    # OpenCV's sign test (dx ^ dy) >= 0; the product differs only where dx or dy is 0 but not both, never diagonal
    diagonal = torch.where(grad.prod(dim=1, keepdim=True) >= 0, keep[:, 2:3], keep[:, 3:4])
    vertical = torch.where(tests[:, 2:] > 0, keep[:, 1:2], diagonal)
    survives = torch.where(tests[:, 1:2] < 0, keep[:, :1], vertical)
    if low > 0:  # below, every pixel of magnitude ≤ low is not a strict maximum in its direction anyway (≥ 0)
        survives &= magnitude > low
    edges = (survives if low == high else survives & (magnitude > high)).squeeze(1)
    if low == high:
        return edges
    weak = survives.squeeze(1) & ~edges
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
    if min(h, w) <= 2 * border:  # every edge is within `border` pixels of the image border
        return torch.zeros(labels.shape, device=labels.device)
    band = canny_edges(labels.remainder(256), 0.1, 0.2).unsqueeze(1).float()
    if border > 0:  # the edges within `border` pixels of the image border dropped
        band = F.pad(band[:, :, border : h - border, border : w - border], (border,) * 4)
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
    return split_labels(target, num_classes, ignore_index)
