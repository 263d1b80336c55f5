"""Cross-entropy of low-resolution logits against a full-resolution label map, without the full-size copy.

``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear"), target)`` keeps the upsampled
``[B, n, H, W]`` logits and their log-softmax alive for backward: 2 × 3.9 GB per 2560² image at n = 150.
Here the output rows are processed in tiles: each tile gathers the two source rows of every output row,
blends them (the exact bilinear weights of ``F.interpolate``), upsamples the width, and reduces to a per-pixel
loss. Backward recomputes each tile and applies the exact gradient (softmax minus one-hot, through the
adjoint of the bilinear resize), so the peak extra memory is one tile and the cost about that of the plain
version. Results equal the plain version up to float rounding.
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


def _upsample_tile(logits: Tensor, i0: Tensor, i1: Tensor, w1: Tensor, width: int, align_corners: bool) -> Tensor:
    """Bilinear upsampling of the output rows ``i0/i1/w1`` describe: ``[B, n, h, w]`` → ``[B, n, t, W]``."""
    w1 = w1.view(1, 1, -1, 1).to(logits.dtype)
    rows = logits.index_select(2, i0) * (1 - w1) + logits.index_select(2, i1) * w1
    if rows.shape[-1] != width:  # rows map to themselves (scale 1), only the width is resized
        rows = F.interpolate(rows, size=(rows.shape[2], width), mode="bilinear", align_corners=align_corners)
    return rows


def _add_upsample_adjoint_(
    grad: Tensor, g: Tensor, i0: Tensor, i1: Tensor, w1: Tensor, width: int, align_corners: bool
) -> None:
    """``grad += upsampleᵀ(g)``: the adjoint of :func:`_upsample_tile` for one tile's output gradient ``g``."""
    b, n, _, w = grad.shape
    t = g.shape[2]
    if width != w:
        g = torch.ops.aten.upsample_bilinear2d_backward(g, [t, width], [b, n, t, w], align_corners)
    wt = w1.view(1, 1, -1, 1).to(g.dtype)
    grad.index_add_(2, i0, g * (1 - wt))
    grad.index_add_(2, i1, g * wt)


class _TiledUpsampledCE(torch.autograd.Function):
    """Σ_pixels weight · CE(upsample(logits), target), one row tile at a time.

    Backward recomputes each tile and applies the exact gradient ``(softmax − onehot) · weight`` through the
    adjoint of the bilinear upsampling, so neither pass keeps a full-resolution tensor.
    """

    @staticmethod
    def forward(ctx, logits, target, pixel_weight, i0, i1, w1, width, align_corners, rows_per_tile):
        ctx.save_for_backward(logits, target, pixel_weight, i0, i1, w1)
        ctx.width, ctx.align_corners, ctx.rows_per_tile = width, align_corners, rows_per_tile
        total = logits.new_zeros(())
        for start in range(0, target.shape[1], rows_per_tile):
            sl = slice(start, start + rows_per_tile)
            up = _upsample_tile(logits, i0[sl], i1[sl], w1[sl], width, align_corners)
            picked = up.gather(1, target[:, sl].unsqueeze(1)).squeeze(1)
            total += ((torch.logsumexp(up, dim=1) - picked) * pixel_weight[:, sl]).sum()
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        logits, target, pixel_weight, i0, i1, w1 = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, target.shape[1], ctx.rows_per_tile):
            sl = slice(start, start + ctx.rows_per_tile)
            g = torch.softmax(_upsample_tile(logits, i0[sl], i1[sl], w1[sl], ctx.width, ctx.align_corners), dim=1)
            g.scatter_add_(1, target[:, sl].unsqueeze(1), torch.full_like(g[:, :1], -1.0))
            g.mul_((pixel_weight[:, sl] * grad_total).unsqueeze(1))
            _add_upsample_adjoint_(grad, g, i0[sl], i1[sl], w1[sl], ctx.width, ctx.align_corners)
        return grad, None, None, None, None, None, None, None, None


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
    rounding), computed in row tiles with recomputation in backward (see the module docstring). Usable as the
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
    b, n, h, _w = logits.shape
    big_h, big_w = target.shape[-2:]
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
        i0, i1, w1 = bilinear_source_rows(big_h, h, align_corners, logits.device)
        budget = TILE_ELEMENTS if tile_elements is None else tile_elements
        rows_per_tile = max(1, budget // max(1, b * n * big_w))
        total = _TiledUpsampledCE.apply(logits, safe, pixel_weight, i0, i1, w1, big_w, align_corners, rows_per_tile)
        if reduction == "sum":
            return total
        if average == "all":
            return total / target.numel()
        return total / pixel_weight.sum().clamp_min(1e-12 if class_weight is not None else 1.0)


class _TiledSigmoidStats(torch.autograd.Function):
    """Per (image, class) sums of ``σ(upsample(logits))``: over all pixels, and over the class's own pixels.

    Returns ``(total [B, n], own [B, n])``; one row tile at a time in both passes.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, i0, i1, w1, width, align_corners, rows_per_tile):
        ctx.save_for_backward(logits, target, valid, i0, i1, w1)
        ctx.width, ctx.align_corners, ctx.rows_per_tile = width, align_corners, rows_per_tile
        b, n = logits.shape[:2]
        total = logits.new_zeros(b, n)
        own = logits.new_zeros(b, n)
        for start in range(0, target.shape[1], rows_per_tile):
            sl = slice(start, start + rows_per_tile)
            prob = torch.sigmoid(_upsample_tile(logits, i0[sl], i1[sl], w1[sl], width, align_corners))
            total += prob.sum(dim=(2, 3))
            mask = torch.zeros_like(prob).scatter_(1, target[:, sl].unsqueeze(1), valid[:, sl].unsqueeze(1).to(prob))
            own += (prob * mask).sum(dim=(2, 3))
        return total, own

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_own):
        logits, target, valid, i0, i1, w1 = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, target.shape[1], ctx.rows_per_tile):
            sl = slice(start, start + ctx.rows_per_tile)
            prob = torch.sigmoid(_upsample_tile(logits, i0[sl], i1[sl], w1[sl], ctx.width, ctx.align_corners))
            mask = torch.zeros_like(prob).scatter_(1, target[:, sl].unsqueeze(1), valid[:, sl].unsqueeze(1).to(prob))
            g = mask.mul_(grad_own[:, :, None, None]).add_(grad_total[:, :, None, None])
            g.mul_(prob).mul_(1 - prob)
            _add_upsample_adjoint_(grad, g, i0[sl], i1[sl], w1[sl], ctx.width, ctx.align_corners)
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
    """
    b, n, h, _ = logits.shape
    big_h, big_w = target.shape[-2:]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        i0, i1, w1 = bilinear_source_rows(big_h, h, align_corners, logits.device)
        budget = TILE_ELEMENTS if tile_elements is None else tile_elements
        rows_per_tile = max(1, budget // max(1, b * n * big_w))
        return _TiledSigmoidStats.apply(logits, target, valid, i0, i1, w1, big_w, align_corners, rows_per_tile)
