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

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import check_choice

__all__ = ["bilinear_source_rows", "upsampled_cross_entropy"]

#: elements of one upsampled tile (``B·n·rows·W``); ~64 MB in float32
TILE_ELEMENTS = 1 << 24


def bilinear_source_rows(out_size: int, in_size: int, align_corners: bool, device: torch.device):
    """Source rows and weights of bilinear resizing along one axis, as ``F.interpolate`` computes them.

    Returns ``(i0, i1, w1)``: ``out[r] = (1 − w1[r])·in[i0[r]] + w1[r]·in[i1[r]]``.
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


def _upsample_tile(src: Tensor, i0: Tensor, i1: Tensor, w1: Tensor, width: int, align_corners: bool) -> Tensor:
    """Bilinear upsampling of the output rows ``i0/i1/w1`` describe, channels last: ``[B, h, w, n]`` → ``[B, t, W, n]``.

    Channels-last keeps the class axis contiguous: the width resize, the reductions over classes and the adjoint
    in backward all run on CPU's (and CUDA's) channels-last kernels, several times faster than on ``[B, n, t, W]``.
    """
    rows = torch.lerp(src.index_select(1, i0), src.index_select(1, i1), w1.view(1, -1, 1, 1).to(src.dtype))
    if rows.shape[2] != width:  # rows map to themselves (scale 1), only the width is resized
        rows = F.interpolate(
            rows.permute(0, 3, 1, 2), size=(rows.shape[1], width), mode="bilinear", align_corners=align_corners
        ).permute(0, 2, 3, 1)
    return rows


def _add_upsample_adjoint_(
    grad: Tensor, g: Tensor, i0: Tensor, i1: Tensor, w1: Tensor, width: int, align_corners: bool
) -> None:
    """``grad += upsampleᵀ(g)``: the adjoint of :func:`_upsample_tile`; ``grad [B, h, w, n]``, ``g [B, t, W, n]``."""
    b, _, w, n = grad.shape
    t = g.shape[1]
    if width != w:
        g = torch.ops.aten.upsample_bilinear2d_backward(
            g.permute(0, 3, 1, 2), [t, width], [b, n, t, w], align_corners
        ).permute(0, 2, 3, 1)
    wt = w1.view(1, -1, 1, 1).to(g.dtype)
    grad.index_add_(1, i0, g * (1 - wt))
    grad.index_add_(1, i1, g * wt)


def _channels_last(logits: Tensor) -> Tensor:
    """``[B, n, h, w]`` → contiguous ``[B, h, w, n]``."""
    return logits.permute(0, 2, 3, 1).contiguous()


def _channels_first(grad: Tensor) -> Tensor:
    """Inverse of :func:`_channels_last`."""
    return grad.permute(0, 3, 1, 2).contiguous()


def _row_tiles(height: int, rows_per_tile: int):
    return (slice(start, start + rows_per_tile) for start in range(0, height, rows_per_tile))


def _tiling(logits: Tensor, target: Tensor, align_corners: bool, tile_elements: int | None) -> tuple:
    """The arguments the tiled Functions share: ``(i0, i1, w1, W, align_corners, rows_per_tile, with_grad)``."""
    b, n, h, _ = logits.shape
    big_h, big_w = target.shape[-2:]
    i0, i1, w1 = bilinear_source_rows(big_h, h, align_corners, logits.device)
    budget = TILE_ELEMENTS if tile_elements is None else tile_elements
    rows_per_tile = max(1, budget // max(1, b * n * big_w))
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    return i0, i1, w1, big_w, align_corners, rows_per_tile, with_grad


class _TiledUpsampledCE(torch.autograd.Function):
    """Σ_pixels weight · CE(upsample(logits), target), one row tile at a time.

    With ``with_grad`` the same pass accumulates ``∂total/∂logits`` (``(softmax − onehot) · weight`` through the
    adjoint of the upsampling); backward scales it by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, pixel_weight, i0, i1, w1, width, align_corners, rows_per_tile, with_grad):
        src = _channels_last(logits)
        grad = torch.zeros_like(src) if with_grad else None
        total = logits.new_zeros(())
        for sl in _row_tiles(target.shape[1], rows_per_tile):
            up = _upsample_tile(src, i0[sl], i1[sl], w1[sl], width, align_corners)
            index = target[:, sl, :, None]
            weight = pixel_weight[:, sl, :, None]
            peak = up.amax(dim=-1, keepdim=True)
            shifted = up.sub_(peak)
            picked = shifted.gather(-1, index)
            prob = shifted.exp_()
            mass = prob.sum(dim=-1, keepdim=True)
            total += ((mass.log() - picked) * weight).sum()
            if with_grad:
                prob.div_(mass).scatter_add_(-1, index, torch.full_like(picked, -1.0)).mul_(weight)
                _add_upsample_adjoint_(grad, prob, i0[sl], i1[sl], w1[sl], width, align_corners)
        if with_grad:
            ctx.save_for_backward(_channels_first(grad))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None, None, None, None, None


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
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    check_choice("average", average, ("valid", "all"))
    n = logits.shape[1]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        valid = (target >= 0) & (target < n)
        if ignore_index is not None:
            valid &= target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        if class_weight is None:
            pixel_weight = valid.to(logits.dtype)
        else:
            pixel_weight = class_weight.to(logits)[safe] * valid
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
    def forward(ctx, logits, target, valid, i0, i1, w1, width, align_corners, rows_per_tile, with_grad):
        src = _channels_last(logits)
        b, n = logits.shape[:2]
        total = logits.new_zeros(b, n)
        own = logits.new_zeros(b, n)
        grad_total = torch.zeros_like(src) if with_grad else None
        grad_own = torch.zeros_like(src) if with_grad else None
        for sl in _row_tiles(target.shape[1], rows_per_tile):
            prob = torch.sigmoid(_upsample_tile(src, i0[sl], i1[sl], w1[sl], width, align_corners))
            index = target[:, sl, :, None]
            mask = valid[:, sl, :, None].to(prob.dtype)
            picked = prob.gather(-1, index)
            total += prob.sum(dim=(1, 2))
            own.scatter_add_(1, index.reshape(b, -1), (picked * mask).reshape(b, -1))
            if with_grad:
                slope = prob.mul_(1 - prob)  # dσ/dz
                own_slope = torch.zeros_like(slope).scatter_(-1, index, slope.gather(-1, index) * mask)
                _add_upsample_adjoint_(grad_total, slope, i0[sl], i1[sl], w1[sl], width, align_corners)
                _add_upsample_adjoint_(grad_own, own_slope, i0[sl], i1[sl], w1[sl], width, align_corners)
        if with_grad:
            ctx.save_for_backward(_channels_first(grad_total), _channels_first(grad_own))
        return total, own

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_own):
        jac_total, jac_own = ctx.saved_tensors
        grad = jac_total * grad_total[:, :, None, None] + jac_own * grad_own[:, :, None, None]
        return grad, None, None, None, None, None, None, None, None, None


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
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return _TiledSigmoidStats.apply(logits, target, valid, *_tiling(logits, target, align_corners, tile_elements))
