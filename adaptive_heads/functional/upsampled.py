"""Cross-entropy and sigmoid statistics of low-resolution logits against a full-resolution label map, without keeping
the full-size copy.

``F.cross_entropy(F.interpolate(logits, (H, W), mode="bilinear"), target)`` keeps the upsampled ``[B, n, H, W]``
logits and their log-softmax alive for backward: 2 × 3.9 GB per 2560² image at n = 150. Here each term is a sum over
pixels (the sigmoid statistics per class), so its gradient is the incoming gradient times a fixed low-resolution
tensor: the forward pass computes that tensor too (softmax minus one-hot, through the adjoint of the bilinear
resize) and keeps it instead of anything full-size. Several logits against the same labels (a head's coarse and
teacher logits) share one pass: they are stacked along the batch and upsampled by one call.

One pass upsamples the whole stack, at most two full-size temporaries, when they fit the device's memory budget
(:func:`~adaptive_heads.memory_budget`): a fixed set of kernels whatever the image size. Otherwise (the CPU's
cache-sized budget, very large images, and ``torch.use_deterministic_algorithms``, whose CUDA upsampling backward
has no deterministic kernel) the output rows are processed in tiles, channels last: each tile blends the two
source rows of every output row (the exact bilinear weights of ``F.interpolate``), upsamples the width and reduces.
Results equal the plain version up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._budget import memory_budget
from .._precision import float32_math, upcast_half
from .._validation import check_choice
from .labels import valid_labels

__all__ = [
    "bilinear_source_rows",
    "upsampled_cross_entropy",
    "upsampled_cross_entropy_sums",
    "upsampled_sigmoid_loss",
    "upsampled_sigmoid_stats",
]

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


class _Plan:
    """How one pass over ``T`` logits ``[B, n, h, w]`` runs: whole, the ``T`` stacked as ``[T·B, n, h, w]``
    (``tiles is None``), or one term at a time in row tiles (the output rows and source window of each, host
    integers); and whether it computes the gradient as it goes."""

    def __init__(self, logits: Sequence[Tensor], size: Sequence[int], align_corners: bool, buffers: int, tile_elements):
        first = logits[0]
        self.align_corners = align_corners
        self.size = (int(size[0]), int(size[1]))
        self.with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in logits)
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        b, n, h = first.shape[:3]
        big_h, big_w = self.size
        if tile_elements is None:
            budget = memory_budget(first.device) // (buffers * (8 if self.dtype == torch.float64 else 4))
        else:
            budget = tile_elements
        # the whole pass's upsample backward has no deterministic CUDA kernel: tiles in deterministic mode there
        whole = not (first.device.type == "cuda" and torch.are_deterministic_algorithms_enabled())
        if whole and len(logits) * b * n * big_w * big_h <= budget:
            self.tiles = None
            return
        self.i0, self.i1, self.w1 = bilinear_source_rows(big_h, h, align_corners, first.device)
        step = max(1, budget // max(1, b * n * big_w))  # output rows of one term per tile
        self.tiles = tuple(
            (s, min(s + step, big_h), *_source_window(s, min(s + step, big_h), big_h, h, align_corners))
            for s in range(0, big_h, step)
        )

    def upsample(self, stacked: Tensor) -> Tensor:
        """The whole stack at label resolution, ``[T·B, n, H, W]``."""
        return F.interpolate(stacked, size=self.size, mode="bilinear", align_corners=self.align_corners)

    def adjoint(self, grad: Tensor, shape: torch.Size) -> Tensor:
        """The adjoint of :meth:`upsample`: ``[T·B, n, H, W]`` → ``shape``."""
        return torch.ops.aten.upsample_bilinear2d_backward(grad, list(self.size), list(shape), self.align_corners)


def _stack(logits: Sequence[Tensor]) -> Tensor:
    """The ``T`` logits ``[B, n, h, w]`` as one float32 (float64) ``[T·B, n, h, w]`` stack."""
    return upcast_half(logits[0] if len(logits) == 1 else torch.cat(list(logits)))


def _term_grads(
    grads: Sequence[Tensor], dtypes: Sequence[torch.dtype], scale: Tensor, tiled: bool
) -> tuple[Tensor, ...]:
    """One gradient per logits, term ``t``'s scaled by ``scale[t]``, in its own dtype: from the whole pass's
    ``[T·B, n, h, w]`` (one product, views of it where the dtypes agree), or from the tiles' ``T`` channels-last
    ``[B, h, w, n]`` (one product each, written channels first: the layout of the logits, which the layer before
    takes without a copy of its own)."""
    if not tiled:
        scaled = grads[0].view(len(dtypes), -1, *grads[0].shape[1:]) * scale.view(-1, 1, 1, 1, 1)
        return tuple(g.to(dtype) for g, dtype in zip(scaled.unbind(0), dtypes, strict=True))
    return tuple(_channels_first(g, dtype, s) for g, s, dtype in zip(grads, scale, dtypes, strict=True))


def _channels_first(grad: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """Channels-last ``grad [B, h, w, n]`` (times ``scale``) as a contiguous ``[B, n, h, w]`` in ``dtype``, one
    write."""
    b, h, w, n = grad.shape
    out = torch.empty(b, n, h, w, dtype=dtype, device=grad.device)
    source = grad.permute(0, 3, 1, 2)
    return out.copy_(source) if scale is None else torch.mul(source, scale, out=out)


def _channels_last_float(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B, n, h, w]`` → contiguous ``[B, h, w, n]`` in ``dtype``, one copy."""
    b, n, h, w = logits.shape
    return torch.empty(b, h, w, n, dtype=dtype, device=logits.device).copy_(logits.permute(0, 2, 3, 1))


def _per_term(index: Tensor, terms: int) -> Tensor:
    """``[B, 1, ...]`` labels or weights as ``[T, B, 1, ...]`` (a broadcast view, no copy)."""
    return index.unsqueeze(0).expand(terms, *index.shape)


# The outputs of the Functions below are accumulated out of place: torch 2.11's inductor gives zero gradients
# through a custom Function whose output is a ``new_zeros`` tensor updated in place (``+=``), silently.


class _UpsampledCE(torch.autograd.Function):
    """``Σ_pixels weight · CE(upsample(logits_t), target)`` for each of ``T`` logits ``[B, n, h, w]`` → ``[T]``.
    With ``plan.with_grad`` the same pass computes ``∂sum_t/∂logits_t`` (``(softmax − onehot) · weight`` through the
    adjoint of the upsampling), kept as one ``[T·B, n, h, w]`` tensor; backward scales each term's by its incoming
    gradient. The whole pass upsamples the ``T`` as one stack; the tiles take one term at a time (the smallest
    temporaries: the budget is tight there)."""

    @staticmethod
    def forward(ctx, safe: Tensor, weight: Tensor, plan: _Plan, *logits: Tensor) -> Tensor:
        run = _UpsampledCE._whole if plan.tiles is None else _UpsampledCE._tiled
        sums, grads = run(logits, safe, weight, plan)
        ctx.save_for_backward(*grads)
        ctx.dtypes, ctx.tiled = [t.dtype for t in logits], plan.tiles is not None
        return sums

    @staticmethod
    def _whole(logits, safe, weight, plan):
        terms = len(logits)
        stacked = _stack(logits)
        up = plan.upsample(stacked)
        big = up.view(terms, -1, *up.shape[1:])  # [T, B, n, H, W]
        index = _per_term(safe.unsqueeze(1), terms)  # [T, B, 1, H, W]
        w = weight.unsqueeze(1)  # [B, 1, H, W]
        big.sub_(big.amax(dim=2, keepdim=True))
        picked = big.gather(2, index)
        big.exp_()
        mass = big.sum(dim=2, keepdim=True)
        per_pixel = mass.log().sub_(picked)  # [T, B, 1, H, W]
        sums = torch.mv(per_pixel.view(terms, -1), weight.reshape(-1))
        if not plan.with_grad:
            return sums, ()
        big.div_(mass).scatter_(2, index, -1.0, reduce="add").mul_(w)  # (softmax − onehot)·weight, one label each
        return sums, (plan.adjoint(up, stacked.shape),)

    @staticmethod
    def _tiled(logits, safe, weight, plan):
        grads, sums = [], []
        width = safe.shape[-1]
        for term in logits:
            src = _channels_last_float(term, plan.dtype)
            grad = torch.zeros_like(src) if plan.with_grad else None
            total = src.new_zeros(())
            for tile in plan.tiles:
                rows = _row_matrix(plan.i0, plan.i1, plan.w1, tile, src.dtype)
                up = _upsample_tile(src, rows, tile, width, plan.align_corners)  # [B, t, W, n]
                index = safe[:, tile[0] : tile[1], :, None]
                w = weight[:, tile[0] : tile[1], :, None]
                up.sub_(up.amax(dim=-1, keepdim=True))
                picked = up.gather(-1, index)
                up.exp_()
                mass = up.sum(dim=-1, keepdim=True)
                total = total + (mass.log().sub_(picked) * w).sum()  # out of place (torch 2.11, see above)
                if grad is not None:
                    up.div_(mass).mul_(w).scatter_add_(-1, index, -w)
                    _add_upsample_adjoint_(grad, up, rows, tile, plan.align_corners)
            sums.append(total)
            if grad is not None:
                grads.append(grad)  # [B, h, w, n]: each term's own, channels last
        return torch.stack(sums), tuple(grads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sums):
        return None, None, None, *_term_grads(ctx.saved_tensors, ctx.dtypes, grad_sums, ctx.tiled)


def upsampled_cross_entropy_sums(
    logits: Sequence[Tensor],
    target: Tensor,
    *,
    ignore_index: int | None = 255,
    align_corners: bool = False,
    class_weight: Tensor | None = None,
    tile_elements: int | None = None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropies of several logits against the same labels, in one pass: ``[T]`` sums and the total
    weight of the valid pixels (their count, or the sum of their class weights). See
    :func:`upsampled_cross_entropy` for the arguments; each of ``logits`` is ``[B, n, h, w]``, the same shape.
    ``valid`` (``[B, H, W]`` bool, or a 0/1 float mask), when given, is the mask of the pixels that count with
    ``target`` a class in ``[0, n)`` at every pixel, the pair :func:`valid_labels` returns (``ignore_index`` is then
    not read).

    Example:
        >>> coarse, fine = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
        >>> target = torch.randint(0, 5, (2, 32, 32))
        >>> sums, count = upsampled_cross_entropy_sums([coarse, fine], target)
        >>> torch.allclose(sums[1] / count, upsampled_cross_entropy(fine, target))
        True
    """
    first = logits[0]
    n = first.shape[1]
    if class_weight is not None and (class_weight.shape != (n,) or class_weight.device != first.device):
        raise ValueError(
            f"class_weight must be a [{n}] tensor on the logits' device {first.device}, got shape "
            f"{tuple(class_weight.shape)} on {class_weight.device} (a copy per call would synchronise the host)"
        )
    with float32_math(first.device):
        plan = _Plan(logits, tuple(target.shape[-2:]), align_corners, 1, tile_elements)
        safe, valid = valid_labels(target, n, ignore_index) if valid is None else (target, valid)
        weight = valid.to(plan.dtype) if class_weight is None else class_weight.to(plan.dtype)[safe] * valid
        return _UpsampledCE.apply(safe, weight, plan, *logits), weight.sum()


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
    rounding), without keeping the upsampled logits for backward (see the module docstring). Usable as the CE of any
    segmentation model, with or without an adaptive head.

    Args:
        logits: ``[B, n, h, w]``.
        target: ``[B, H, W]`` integer labels; ``ignore_index`` pixels contribute nothing.
        align_corners: of the bilinear upsampling to ``H×W``.
        average: ``"valid"`` divides the summed loss by the number (or class weight) of valid pixels;
            ``"all"`` by all ``B·H·W`` pixels (mmseg 0.x's main loss). Ignored with ``reduction="sum"``.
        reduction: ``"mean"`` or ``"sum"``.
        class_weight: optional ``[n]`` per-class weights (as ``F.cross_entropy``'s ``weight``).
        tile_elements: elements of one upsampled tile; default: one pass where the device's memory budget allows
            (:func:`~adaptive_heads.memory_budget`), tiles of that size otherwise.

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
    sums, weight = upsampled_cross_entropy_sums(
        [logits], target, ignore_index=ignore_index, align_corners=align_corners, class_weight=class_weight,
        tile_elements=tile_elements,
    )  # fmt: skip
    total = sums[0]
    if reduction == "sum":
        return total
    if average == "all":
        return total / target.numel()
    return total / weight.clamp_min(1e-12 if class_weight is not None else 1.0)


#: a loss of the per-(image, class) sigmoid sums: ``(total [T, B, n], own [T, B, n], *extra) → (value [T],
#: ∂value/∂total, ∂value/∂own)``, evaluated without autograd
SigmoidReduction = Callable[..., tuple[Tensor, Tensor, Tensor]]


class _UpsampledSigmoid(torch.autograd.Function):
    """Per (image, class) sums of ``σ(upsample(logits_t))`` for ``T`` logits ``[B, n, h, w]``: over all pixels, and
    over the valid pixels of the class, ``(total [T·B, n], own [T·B, n])``.

    Both are sums, so with ``plan.with_grad`` the pass also computes their Jacobians as logits-sized tensors
    (``upsampleᵀ σ'`` and ``upsampleᵀ (σ' · own-class mask)``); backward weights them by the incoming gradients.
    With a ``reduce`` (:data:`SigmoidReduction`) the Function returns ``reduce``'s ``[T]`` value instead, and the
    pass weights the slopes by ``reduce``'s partial derivatives before the adjoint of the upsampling: one
    logits-sized gradient, kept for backward, and one adjoint (whole pass). The tiles take one term at a time.
    The arguments after ``reduce``: how many of the tensors are ``reduce``'s extra inputs, then those, then the
    logits."""

    @staticmethod
    def forward(ctx, safe: Tensor, valid: Tensor, plan: _Plan, reduce, extras: int, *tensors: Tensor):
        extra, logits = tensors[:extras], tensors[extras:]
        ctx.reduced, ctx.extras, ctx.dtypes = reduce is not None, extras, [t.dtype for t in logits]
        ctx.tiled = plan.tiles is not None
        run = _UpsampledSigmoid._whole if plan.tiles is None else _UpsampledSigmoid._tiled
        total, own, grads = run(logits, safe, valid, plan, reduce, extra)
        ctx.save_for_backward(*grads)
        return (total, own) if reduce is None else total  # reduced: total holds the value

    @staticmethod
    def _whole(logits, safe, valid, plan, reduce, extra):
        terms = len(logits)
        stacked = _stack(logits)
        prob = plan.upsample(stacked).sigmoid_()  # [T·B, n, H, W]
        big = prob.view(terms, -1, *prob.shape[1:])
        index = _per_term(safe.unsqueeze(1), terms)  # [T, B, 1, H, W]
        mask = valid.unsqueeze(1).to(prob.dtype)
        total = prob.sum(dim=(2, 3))
        labels = _per_term(safe.flatten(1), terms)  # [T, B, H·W]
        picked = big.gather(2, index).mul_(mask)  # [T, B, 1, H, W]
        own = big.new_zeros(terms, prob.shape[0] // terms, prob.shape[1]).scatter_add_(2, labels, picked.flatten(2))
        if reduce is not None:
            value, d_total, d_own = reduce(total.view_as(own), own, *extra)
            if not plan.with_grad:
                return value, None, ()
            prob.addcmul_(prob, prob, value=-1.0)  # σ' = σ (1 − σ), in place
            own_slope = picked.addcmul_(picked, picked, value=-1.0).mul_(_per_pixel(d_own, index))  # 0 if invalid
            big.mul_(d_total[..., None, None]).scatter_add_(2, index, own_slope)
            return value, None, (plan.adjoint(prob, stacked.shape),)
        if not plan.with_grad:
            return total, own.flatten(0, 1), ()
        prob.addcmul_(prob, prob, value=-1.0)
        jac_total = plan.adjoint(prob, stacked.shape)
        big.zero_().scatter_(2, index, picked.addcmul_(picked, picked, value=-1.0))  # σ' on the valid own pixels
        return total, own.flatten(0, 1), (jac_total, plan.adjoint(prob, stacked.shape))

    @staticmethod
    def _tiled(logits, safe, valid, plan, reduce, extra):
        b, n = logits[0].shape[:2]
        width = safe.shape[-1]
        grads, jacobians = [], []  # per term, channels last: the reduced gradient, or the two Jacobians
        totals, owns, values = [], [], []
        for term in logits:
            src = _channels_last_float(term, plan.dtype)
            total, own = src.new_zeros(b, n), src.new_zeros(b, n)
            jac_total = torch.zeros_like(src) if plan.with_grad else None
            jac_own = torch.zeros_like(src) if plan.with_grad else None
            for tile in plan.tiles:
                rows = _row_matrix(plan.i0, plan.i1, plan.w1, tile, src.dtype)
                prob = torch.sigmoid(_upsample_tile(src, rows, tile, width, plan.align_corners))  # [B, t, W, n]
                index = safe[:, tile[0] : tile[1], :, None]
                mask = valid[:, tile[0] : tile[1], :, None].to(prob.dtype)
                total = total + prob.sum(dim=(1, 2))  # out of place (torch 2.11, see above)
                picked = prob.gather(-1, index) * mask
                own = own.scatter_add(1, index.flatten(1), picked.flatten(1))
                if jac_total is not None:
                    slope = prob.mul_(1 - prob)  # dσ/dz
                    own_slope = torch.zeros_like(prob).scatter_(-1, index, prob.gather(-1, index) * mask)
                    _add_upsample_adjoint_(jac_total, slope, rows, tile, plan.align_corners)
                    _add_upsample_adjoint_(jac_own, own_slope, rows, tile, plan.align_corners)
            if reduce is not None:  # the sums of this term are complete: weight its Jacobians at the logits' size
                value, d_total, d_own = reduce(total[None], own[None], *extra)
                values.append(value[0])
                if jac_total is not None:
                    grads.append(jac_total.mul_(d_total[0, :, None, None]).addcmul_(jac_own, d_own[0, :, None, None]))
            else:
                totals.append(total)
                owns.append(own)
                if jac_total is not None:
                    jacobians += [jac_total, jac_own]
        if reduce is not None:
            return torch.stack(values), None, tuple(grads)
        return torch.cat(totals), torch.cat(owns), tuple(jacobians)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        skipped = (None,) * (5 + ctx.extras)
        saved = ctx.saved_tensors
        if ctx.reduced:  # one gradient per term, scaled by that term's incoming gradient
            return *skipped, *_term_grads(saved, ctx.dtypes, grads[0], ctx.tiled)
        if not ctx.tiled:  # the whole pass: [T·B, n, h, w] Jacobians
            jac_total, jac_own = saved
            grad = (jac_total * grads[0][:, :, None, None]).addcmul_(jac_own, grads[1][:, :, None, None])
            return *skipped, *_term_grads((grad,), ctx.dtypes, grad.new_ones(len(ctx.dtypes)), tiled=False)
        b = saved[0].shape[0]
        per_term = []
        for t, dtype in enumerate(ctx.dtypes):  # the tiles: channels-last Jacobians per term
            g_total, g_own = (g[t * b : (t + 1) * b, None, None, :] for g in grads)
            per_term.append(_channels_first((saved[2 * t] * g_total).addcmul_(saved[2 * t + 1], g_own), dtype))
        return *skipped, *per_term


def _per_pixel(per_class: Tensor, index: Tensor) -> Tensor:
    """``per_class [T, B, n]`` at each pixel's label ``index [T, B, 1, H, W]``: ``[T, B, 1, H, W]``."""
    return per_class[..., None, None].expand(*per_class.shape, *index.shape[-2:]).gather(2, index)


def upsampled_sigmoid_loss(
    logits: Sequence[Tensor],
    target: Tensor,
    valid: Tensor,
    reduce: SigmoidReduction,
    *extra: Tensor,
    align_corners: bool = True,
    tile_elements: int | None = None,
) -> Tensor:
    """A loss of the per-(image, class) sigmoid sums of several logits against the same labels
    (:func:`upsampled_sigmoid_stats`'s ``total`` and ``own``), its gradient computed in the same pass: ``[T]``.

    Args:
        logits: ``T`` logits ``[B, n, h, w]`` of one shape.
        target, valid: as for :func:`upsampled_sigmoid_stats`.
        reduce: ``reduce(total, own, *extra) → (value, ∂value/∂total, ∂value/∂own)`` with ``total``, ``own``
            ``[T, B, n]`` and ``value`` ``[T]`` (``value[t]`` a function of the ``t``-th sums alone), evaluated
            without autograd: the derivatives are written out (sigmoid dice:
            :func:`~adaptive_heads.functional.sigmoid_dice_losses`).
        extra: tensors ``reduce`` reads (no gradient), e.g. the class areas.

    Example:
        >>> def mean_own(total, own):  # the mean of σ over each logits' own-class pixels, per term
        ...     return own.sum(dim=(1, 2)) / 16, torch.zeros_like(total), torch.full_like(own, 1 / 16)
        >>> logits = torch.zeros(1, 2, 2, 2, requires_grad=True)
        >>> target = torch.zeros(1, 4, 4, dtype=torch.long)
        >>> upsampled_sigmoid_loss([logits], target, torch.ones(1, 4, 4, dtype=torch.bool), mean_own)
        tensor([0.5000], grad_fn=<_UpsampledSigmoidBackward>)
    """
    with float32_math(logits[0].device):
        plan = _Plan(logits, tuple(target.shape[-2:]), align_corners, 1, tile_elements)
        return _UpsampledSigmoid.apply(target, valid, plan, reduce, len(extra), *extra, *logits)


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
        valid: ``[B, H, W]`` bool (or a 0/1 float mask), pixels that belong to their label's class.
        tile_elements: as for :func:`upsampled_cross_entropy`.

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
        plan = _Plan([logits], tuple(target.shape[-2:]), align_corners, 1, tile_elements)
        return _UpsampledSigmoid.apply(target, valid, plan, None, 0, logits)
