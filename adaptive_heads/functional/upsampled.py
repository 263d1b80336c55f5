"""Cross-entropy of low-resolution logits against a full-resolution label map, without the full-size copy.

``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear"), target)`` keeps the upsampled
``[B, n, H, W]`` logits and their log-softmax alive for backward: 2 × 3.9 GB per 2560² image at n = 150.
Here the output rows are processed in tiles, channels last: each tile gathers the two source rows of every
output row, blends them (the exact bilinear weights of ``F.interpolate``), upsamples the width, and reduces
to a per-pixel loss. The loss is a scalar (the sigmoid statistics are per-class sums), so its gradient is the
incoming gradient times a fixed low-resolution tensor: the same pass computes that tensor (softmax minus
one-hot, through the adjoint of the bilinear resize) and keeps it instead of anything full-size. Peak extra
memory is one tile plus one logits-sized tensor; each pixel is upsampled and exponentiated once, so the
forward + backward costs about one plain forward. Results equal the plain version up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._precision import float32_math, upcast_half
from .._validation import check_choice

__all__ = ["bilinear_source_rows", "upsampled_cross_entropy"]

#: elements of one upsampled tile (``B·n·rows·W``); ~64 MB in float32
TILE_ELEMENTS = 1 << 24

#: one row tile: ``(start, stop)`` output rows and the ``[lo, hi)`` source rows they read
RowTile = tuple[int, int, int, int]


def bilinear_source_rows(out_size: int, in_size: int, align_corners: bool, device: torch.device):
    """Source rows and weights of bilinear resizing along one axis, as ``F.interpolate`` computes them.

    Returns ``(i0, i1, w1)``: ``out[r] = (1 − w1[r])·in[i0[r]] + w1[r]·in[i1[r]]``.

    Example:
        >>> i0, i1, w1 = bilinear_source_rows(4, 2, align_corners=True, device=torch.device("cpu"))
        >>> i0.tolist(), i1.tolist(), [round(w, 3) for w in w1.tolist()]
        ([0, 0, 0, 1], [1, 1, 1, 1], [0.0, 0.333, 0.667, 0.0])
    """
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = dst * scale
    else:
        src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, (src - i0).clamp(0.0, 1.0)


def _source_window(start: int, stop: int, out_size: int, in_size: int, align_corners: bool) -> tuple[int, int]:
    """Source rows ``[lo, hi)`` that output rows ``[start, stop)`` read, from the sizes alone (no tensor is read):
    :func:`bilinear_source_rows` in double precision on the host, widened by one row on each side to cover float32
    rounding on the device."""
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        first, last = start * scale, (stop - 1) * scale
    else:
        scale = in_size / out_size
        first, last = max((start + 0.5) * scale - 0.5, 0.0), max((stop - 0.5) * scale - 0.5, 0.0)
    return max(0, math.floor(first) - 1), min(in_size, math.floor(last) + 3)


def _row_matrix(i0: Tensor, i1: Tensor, w1: Tensor, tile: RowTile, dtype: torch.dtype) -> Tensor:
    """``[t, hi − lo]`` bilinear weights of the tile's output rows over its source window: one GEMM applies the row
    resize (``R @ src``) and its adjoint (``Rᵀ @ g``), so no index scatter (atomics on CUDA, miscompiled by
    inductor on CPU) is needed."""
    start, stop, lo, hi = tile
    cols = torch.arange(hi - lo, device=i0.device)
    weight = w1[start:stop, None].to(dtype)
    first = (i0[start:stop, None] - lo == cols).to(dtype)
    second = (i1[start:stop, None] - lo == cols).to(dtype)
    return first * (1 - weight) + second * weight


def _upsample_tile(src: Tensor, rows: Tensor, tile: RowTile, width: int, align_corners: bool) -> Tensor:
    """Bilinear upsampling of one tile of output rows, channels last: ``[B, h, w, n]`` → ``[B, t, W, n]``.

    ``rows`` is the tile's :func:`_row_matrix`. Channels-last keeps the class axis contiguous: the width resize,
    the reductions over classes and the adjoint in backward all run on CPU's (and CUDA's) channels-last kernels,
    several times faster than on ``[B, n, t, W]``.
    """
    b, _, w, n = src.shape
    _, _, lo, hi = tile
    out = torch.matmul(rows, src[:, lo:hi].reshape(b, hi - lo, w * n)).view(b, rows.shape[0], w, n)
    if w != width:
        out = F.interpolate(
            out.permute(0, 3, 1, 2), size=(out.shape[1], width), mode="bilinear", align_corners=align_corners
        ).permute(0, 2, 3, 1)
    return out


#: output columns per block of the deterministic width adjoint
COLUMN_BLOCK = 256


def _width_adjoint(g: Tensor, width: int, align_corners: bool) -> Tensor:
    """The adjoint of the bilinear width resize: ``[B, t, W, n]`` → ``[B, t, w, n]``.

    PyTorch's upsample-backward kernel, except in deterministic mode (``torch.use_deterministic_algorithms``),
    where that kernel has no deterministic CUDA implementation: there the adjoint is a banded matrix product per
    block of :data:`COLUMN_BLOCK` output columns (each block reads a window of a few source columns)."""
    b, t, big_w, n = g.shape
    if not torch.are_deterministic_algorithms_enabled():
        return torch.ops.aten.upsample_bilinear2d_backward(
            g.permute(0, 3, 1, 2), [t, big_w], [b, n, t, width], align_corners
        ).permute(0, 2, 3, 1)
    i0, i1, w1 = bilinear_source_rows(big_w, width, align_corners, g.device)
    out = g.new_zeros(b, t, width, n)
    for start in range(0, big_w, COLUMN_BLOCK):
        block = (
            start,
            min(start + COLUMN_BLOCK, big_w),
            *_source_window(start, min(start + COLUMN_BLOCK, big_w), big_w, width, align_corners),
        )
        cols = _row_matrix(i0, i1, w1, block, g.dtype)  # [block columns, window]
        out[:, :, block[2] : block[3]] += torch.einsum("btcn,cr->btrn", g[:, :, block[0] : block[1]], cols)
    return out


def _add_upsample_adjoint_(grad: Tensor, g: Tensor, rows: Tensor, tile: RowTile, align_corners: bool) -> None:
    """``grad += upsampleᵀ(g)``: the adjoint of :func:`_upsample_tile`; ``grad [B, h, w, n]``, ``g [B, t, W, n]``."""
    b, _, w, n = grad.shape
    t = g.shape[1]
    _, _, lo, hi = tile
    if g.shape[2] != w:
        g = _width_adjoint(g, w, align_corners)
    grad[:, lo:hi] += torch.matmul(rows.t(), g.reshape(b, t, w * n)).view(b, hi - lo, w, n)


def _channels_last(logits: Tensor) -> Tensor:
    """``[B, n, h, w]`` → contiguous ``[B, h, w, n]``."""
    return logits.permute(0, 2, 3, 1).contiguous()


def _channels_first(grad: Tensor) -> Tensor:
    """Inverse of :func:`_channels_last`."""
    return grad.permute(0, 3, 1, 2).contiguous()


def _tiling(logits: Tensor, target: Tensor, align_corners: bool, tile_elements: int | None) -> tuple:
    """The arguments the tiled Functions share: ``(i0, i1, w1, tiles, align_corners, with_grad)``, with ``tiles``
    the ``(start, stop, lo, hi)`` output rows and source window of each row tile (host integers)."""
    b, n, h, _ = logits.shape
    big_h, big_w = target.shape[-2:]
    i0, i1, w1 = bilinear_source_rows(big_h, h, align_corners, logits.device)
    budget = TILE_ELEMENTS if tile_elements is None else tile_elements
    step = max(1, budget // max(1, b * n * big_w))
    tiles = tuple(
        (start, min(start + step, big_h), *_source_window(start, min(start + step, big_h), big_h, h, align_corners))
        for start in range(0, big_h, step)
    )
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    return i0, i1, w1, tiles, align_corners, with_grad


# The outputs of the Functions below are accumulated out of place: torch 2.11's inductor gives zero gradients
# through a custom Function whose output is a ``new_zeros`` tensor updated in place (``+=``), silently.


class _TiledUpsampledCE(torch.autograd.Function):
    """Σ_pixels weight · CE(upsample(logits), target), one row tile at a time.

    With ``with_grad`` the same pass accumulates ``∂total/∂logits`` (``(softmax − onehot) · weight`` through the
    adjoint of the upsampling); backward scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, pixel_weight, i0, i1, w1, tiles, align_corners, with_grad):
        src = _channels_last(logits)
        grad = torch.zeros_like(src) if with_grad else None
        total = logits.new_zeros(())
        width = target.shape[-1]
        for tile in tiles:
            rows = _row_matrix(i0, i1, w1, tile, src.dtype)
            up = _upsample_tile(src, rows, tile, width, align_corners)
            index = target[:, tile[0] : tile[1], :, None]
            weight = pixel_weight[:, tile[0] : tile[1], :, None]
            peak = up.amax(dim=-1, keepdim=True)
            shifted = up.sub_(peak)
            picked = shifted.gather(-1, index)
            prob = shifted.exp_()
            mass = prob.sum(dim=-1, keepdim=True)
            total = total + ((mass.log() - picked) * weight).sum()  # out of place (torch 2.11, see above)
            if with_grad:
                prob.div_(mass).scatter_add_(-1, index, torch.full_like(picked, -1.0)).mul_(weight)
                _add_upsample_adjoint_(grad, prob, rows, tile, align_corners)
        if with_grad:
            ctx.save_for_backward(_channels_first(grad))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None, None, None, None


def upsampled_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int | None = 255,
    align_corners: bool = False,
    average: str = "valid",
    reduction: str = "mean",
    class_weight: Tensor | None = None,
    tile_elements: int | None = None,
) -> Tensor:
    """Cross-entropy of feature-resolution logits against a label map, after bilinear upsampling.

    Equal to ``F.cross_entropy(F.interpolate(logits, target.shape[-2:], mode="bilinear",
    align_corners=align_corners), target, weight=class_weight, ignore_index=ignore_index)`` (up to float
    rounding), computed in row tiles that also accumulate the gradient (see the module docstring). Usable as the
    CE of any segmentation model, with or without an adaptive head.

    Args:
        logits: ``[B, n, h, w]``.
        target: ``[B, H, W]`` integer labels; ``ignore_index`` pixels contribute nothing.
        align_corners: of the bilinear upsampling to ``H×W``.
        average: ``"valid"`` divides the summed loss by the number (or class weight) of valid pixels;
            ``"all"`` by all ``B·H·W`` pixels (mmseg 0.x's main loss). Ignored with ``reduction="sum"``.
        reduction: ``"mean"`` or ``"sum"``.
        class_weight: optional ``[n]`` per-class weights (as ``F.cross_entropy``'s ``weight``).
        tile_elements: elements of one upsampled tile (default :data:`TILE_ELEMENTS`).

    Returns:
        A float32 scalar (float64 for float64 logits); exactly 0 with a zero gradient when every pixel is
        ignored.

    Example:
        >>> logits = torch.randn(2, 5, 8, 8, requires_grad=True)
        >>> target = torch.randint(0, 5, (2, 32, 32))
        >>> plain = torch.nn.functional.cross_entropy(
        ...     torch.nn.functional.interpolate(logits, (32, 32), mode="bilinear"), target)
        >>> torch.allclose(upsampled_cross_entropy(logits, target), plain, atol=1e-5)
        True
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    check_choice("average", average, ("valid", "all"))
    n = logits.shape[1]
    if class_weight is not None and (class_weight.shape != (n,) or class_weight.device != logits.device):
        raise ValueError(
            f"class_weight must be a [{n}] tensor on the logits' device {logits.device}, got shape "
            f"{tuple(class_weight.shape)} on {class_weight.device} (a copy per call would synchronise the host)"
        )
    with float32_math(logits.device):
        logits = upcast_half(logits)
        valid = (target >= 0) & (target < n)
        if ignore_index is not None:
            valid &= target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        if class_weight is None:
            pixel_weight = valid.to(logits.dtype)
        else:
            pixel_weight = class_weight.to(logits.dtype)[safe] * valid
        total = _TiledUpsampledCE.apply(
            logits, safe, pixel_weight, *_tiling(logits, target, align_corners, tile_elements)
        )
        if reduction == "sum":
            return total
        if average == "all":
            return total / target.numel()
        return total / pixel_weight.sum().clamp_min(1e-12 if class_weight is not None else 1.0)


class _TiledSigmoidStats(torch.autograd.Function):
    """Per (image, class) sums of ``σ(upsample(logits))``: over all pixels, and over the class's own pixels.

    Returns ``(total [B, n], own [B, n])``, one row tile at a time. Both are per-class sums, so with
    ``with_grad`` the pass also accumulates their two Jacobians as logits-sized tensors (``upsampleᵀ σ'`` and
    ``upsampleᵀ (σ' · own-class mask)``); backward weights them by the incoming per-class gradients.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, i0, i1, w1, tiles, align_corners, with_grad):
        src = _channels_last(logits)
        b, n = logits.shape[:2]
        width = target.shape[-1]
        total = logits.new_zeros(b, n)
        own = logits.new_zeros(b, n)
        grad_total = torch.zeros_like(src) if with_grad else None
        grad_own = torch.zeros_like(src) if with_grad else None
        for tile in tiles:
            rows = _row_matrix(i0, i1, w1, tile, src.dtype)
            prob = torch.sigmoid(_upsample_tile(src, rows, tile, width, align_corners))
            index = target[:, tile[0] : tile[1], :, None]
            mask = valid[:, tile[0] : tile[1], :, None].to(prob.dtype)
            picked = prob.gather(-1, index)
            total = total + prob.sum(dim=(1, 2))  # out of place (torch 2.11, see above)
            own = own.scatter_add(1, index.reshape(b, -1), (picked * mask).reshape(b, -1))
            if with_grad:
                slope = prob.mul_(1 - prob)  # dσ/dz
                own_slope = torch.zeros_like(slope).scatter_(-1, index, slope.gather(-1, index) * mask)
                _add_upsample_adjoint_(grad_total, slope, rows, tile, align_corners)
                _add_upsample_adjoint_(grad_own, own_slope, rows, tile, align_corners)
        if with_grad:
            ctx.save_for_backward(_channels_first(grad_total), _channels_first(grad_own))
        return total, own

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_own):
        jac_total, jac_own = ctx.saved_tensors
        grad = jac_total * grad_total[:, :, None, None] + jac_own * grad_own[:, :, None, None]
        return grad, None, None, None, None, None, None, None, None


def upsampled_sigmoid_stats(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    *,
    align_corners: bool = True,
    tile_elements: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``σ`` of the bilinearly upsampled logits, summed per (image, class) without a full-resolution copy.

    Args:
        logits: ``[B, n, h, w]``.
        target: ``[B, H, W]`` labels in ``[0, n)`` (ignored pixels may hold any class; see ``valid``).
        valid: ``[B, H, W]`` bool, pixels that belong to their label's class.

    Returns:
        ``(total, own)``, each ``[B, n]``: ``Σ_p σ(z_bcp)`` over all pixels, and over the valid pixels labelled c.

    Example:
        >>> logits = torch.zeros(1, 2, 2, 2)  # σ = 1/2 everywhere
        >>> target = torch.zeros(1, 4, 4, dtype=torch.long)
        >>> total, own = upsampled_sigmoid_stats(logits, target, torch.ones(1, 4, 4, dtype=torch.bool))
        >>> total, own  # 16 pixels × 1/2 per class; class 0 owns every pixel
        (tensor([[8., 8.]]), tensor([[8., 0.]]))
    """
    with float32_math(logits.device):
        logits = upcast_half(logits)
        return _TiledSigmoidStats.apply(logits, target, valid, *_tiling(logits, target, align_corners, tile_elements))
