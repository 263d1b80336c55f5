"""Per-pixel products of the heads: the 1×1 conv, cosine logits, and the channel norm they share.

Every pixel of ``[B, C, h, w]`` features is multiplied by a ``[n, C]`` classifier (or one ``[n, C]`` classifier per
image). Where those products run, and in which precision:

- on CUDA (and any device but the CPU) they are convolutions (a grouped one for per-image classifiers), so that
  they follow the precision policy of the 1×1 conv the heads replace: ``torch.backends.cudnn.allow_tf32`` (on by
  default) governs both, and ``adopt_classifier``'s coarse logits equal the original model's. ProtoSeg's
  pixel–prototype similarities take the same path (:func:`pixel_products`);
- on the CPU they are batched matmuls (oneDNN's 1×1 convolution costs layout conversions, ~1.4× slower at C = 512),
  as are channels-last features everywhere;
- under autocast (or with half features) they run in the half dtype, accumulated in float32 by the GEMM libraries,
  and the norms in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._layout import is_channels_last
from .._precision import compute_dtype, float32_math, upcast_half
from .._validation import is_tracing

__all__ = ["channel_norm", "cosine_logits", "pointwise_conv"]


def _convolution_device(x: Tensor) -> bool:
    """Whether the per-pixel products of ``x`` run as convolutions: off the CPU (CUDA: the conv's precision policy);
    the one place that decides (the tests take the convolution path on the CPU through it)."""
    return x.device.type != "cpu"


def _as_convolution(x: Tensor) -> bool:
    """Run per-image products as grouped convolutions (off the CPU) or as matmuls (the CPU, and channels-last
    features, whose ``[1, B·C, h, w]`` view would be a copy)."""
    return _convolution_device(x) and not is_channels_last(x)


def classify_pixels(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``weight @ x (+ bias)`` per pixel: ``x [B, C, h, w]``, ``weight`` ``[n, C]`` or ``[B, n, C]`` (same dtype),
    ``bias [n]`` → ``[B, n, h, w]`` (see the module docstring for where it runs)."""
    b, c, h, w = x.shape
    n = weight.shape[-2]
    if _convolution_device(x) and weight.dim() == 2:  # one classifier: the conv it replaces, in any layout
        return F.conv2d(x, weight[:, :, None, None], bias)
    if _as_convolution(x):
        bias = None if bias is None else bias.repeat(b)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(b * n, c, 1, 1), bias, groups=b)
        return out.view(b, n, h, w)
    if is_channels_last(x):
        flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: [B, N, C] with C contiguous
        wt = weight.transpose(-1, -2)
        wt = wt.expand(b, c, n) if wt.dim() == 2 else wt
        out = torch.bmm(flat, wt) if bias is None else torch.baddbmm(bias.view(1, 1, n), flat, wt)
        return out.view(b, h, w, n).permute(0, 3, 1, 2)
    flat = x.contiguous().view(b, c, h * w)
    weight = weight.expand(b, n, c) if weight.dim() == 2 else weight
    out = torch.bmm(weight, flat) if bias is None else torch.baddbmm(bias.view(1, n, 1), weight, flat)
    return out.view(b, n, h, w)


def _rows_as_convolution(rows: Tensor) -> bool:
    """:func:`pixel_products` as a convolution: off the CPU, for rows with contiguous channels."""
    return _convolution_device(rows) and rows.stride(-1) == 1


def pixel_products(rows: Tensor, weight: Tensor) -> Tensor:
    """``rows @ weightᵀ`` for ``rows [N, k]`` (one row per pixel) and ``weight [m, k]``: ``[N, m]``, where
    :func:`classify_pixels` runs its products (a 1×1 convolution of the rows as a channels-last ``[1, k, N, 1]`` map
    off the CPU, a matmul on it), so that ProtoSeg's similarities follow the conv's precision policy too."""
    if not _rows_as_convolution(rows):
        return rows @ weight.t()
    image = rows.t()[None, :, :, None].contiguous(memory_format=torch.channels_last)  # a view of the rows
    out = F.conv2d(image, weight.contiguous()[:, :, None, None])  # [1, m, N, 1], channels last
    return out[0, :, :, 0].t()


def _classify_pixels_backward(
    grad: Tensor, x: Tensor, weight: Tensor, needs: tuple[bool, bool]
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of :func:`classify_pixels` (per-image ``weight [B, n, C]``) for ``grad [B, n, h, w]``:
    ``(∂/∂x, ∂/∂weight)``, each where ``needs`` asks."""
    b, c, h, w = x.shape
    n = weight.shape[-2]
    if _as_convolution(x):
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.reshape(1, b * n, h, w), x.reshape(1, b * c, h, w), weight.reshape(b * n, c, 1, 1), None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], b, [needs[0], needs[1], False],
        )  # fmt: skip
        return (
            None if grad_x is None else grad_x.view(b, c, h, w),
            None if grad_w is None else grad_w.view(b, n, c),
        )
    if is_channels_last(x):
        g = grad.permute(0, 2, 3, 1).reshape(b, h * w, n)  # [B, N, n]
        flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        grad_x = torch.bmm(g, weight).view(b, h, w, c).permute(0, 3, 1, 2) if needs[0] else None
        return grad_x, torch.bmm(g.transpose(1, 2), flat) if needs[1] else None
    g = grad.reshape(b, n, h * w)
    flat = x.contiguous().view(b, c, h * w)
    grad_x = torch.bmm(weight.transpose(1, 2), g).view(b, c, h, w) if needs[0] else None
    return grad_x, torch.bmm(g, flat.transpose(1, 2)) if needs[1] else None


def pointwise_conv(feat: Tensor, weight: Tensor, bias: Tensor | None = None, channel_dropout: float = 0.0) -> Tensor:
    """A 1×1 convolution ``W @ x + b``: ``[B, C, h, w]`` → ``[B, n, h, w]`` (see the module docstring for where it
    runs).

    Same result as ``F.conv2d(feat, weight, bias)``. ``channel_dropout = p > 0`` gives the convolution of
    ``F.dropout2d(feat, p)`` (whole input channels zeroed per image, survivors scaled by ``1/(1-p)``) by scaling a
    per-image copy of the ``[n, C]`` weight instead of copying the feature map.

    Args:
        feat: ``[B, C, h, w]``.
        weight: ``[n, C]`` or a 1×1 conv weight ``[n, C, 1, 1]``.
        bias: ``[n]`` or ``None``.
        channel_dropout: ``Dropout2d`` probability applied to ``feat`` (0: none).

    Example:
        >>> conv = torch.nn.Conv2d(8, 3, 1)
        >>> x = torch.randn(2, 8, 5, 6)
        >>> torch.allclose(pointwise_conv(x, conv.weight, conv.bias), conv(x), atol=1e-6)
        True
    """
    b, c = feat.shape[:2]
    n = weight.shape[0]
    if weight.numel() != n * c:
        raise ValueError(f"weight must be [n, {c}] or [n, {c}, 1, 1] for these features, got {tuple(weight.shape)}")
    weight = weight.reshape(n, c)
    if channel_dropout > 0:
        keep = feat.new_empty(b, 1, c).bernoulli_(1.0 - channel_dropout).div_(1.0 - channel_dropout)
        weight = weight * keep.to(weight.dtype)  # [B, n, C]
    return classify_pixels(feat, weight, bias)


#: pixels per chunk of :func:`channel_norm` × channels on the CPU (keeps each chunk in cache)
_NORM_CHUNK_ELEMENTS = 1 << 20


def _chunked_sq_norm(x: Tensor) -> Tensor:
    """``Σ_c x²`` ``[B, 1, N]`` in float32 (or wider), a half input upcast one pixel chunk at a time (CPU)."""
    b, c, n = x.shape
    out = x.new_empty(b, 1, n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    step = max(1, _NORM_CHUNK_ELEMENTS // max(1, c))
    for start in range(0, n, step):
        chunk = upcast_half(x[:, :, start : start + step])
        out[:, :, start : start + step] = chunk.square().sum(1, keepdim=True)
    return out


class _ChannelNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = _chunked_sq_norm(x).sqrt_()
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        x, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
        return (x * scale).to(x.dtype)


def channel_norm(x: Tensor) -> Tensor:
    """L2 norm over the channel axis of ``[B, C, N]`` → ``[B, 1, N]`` (float32 for half input).

    Equal to ``torch.linalg.vector_norm(x, dim=1, keepdim=True)``; on the CPU in pixel chunks that stay in cache
    (several times faster than the strided reduction) and without an ``x²`` copy, elsewhere (and while
    ``torch.compile``/``torch.export`` trace) the single ``vector_norm`` op. The gradient at a zero vector is 0.

    Example:
        >>> channel_norm(torch.tensor([[[3.0, 0.0], [4.0, 0.0]]]))  # [B=1, C=2, N=2]
        tensor([[[5., 0.]]])
    """
    if x.device.type != "cpu" or is_tracing():
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChannelNorm.apply(x)
    return _chunked_sq_norm(x).sqrt_()


class _CosineLogits(torch.autograd.Function):
    """``scale · ŵ x / max(‖x‖, eps)`` with ``ŵ = w / max(‖w‖, eps)`` for per-image classifiers ``w [B, n_i, C]``, one
    output per classifier, all of them in one product that shares the feature norm (a head's student and teacher).
    The backward is written out: two products and a few ``[B, 1, N]`` and ``[B, M, 1]`` ops instead of autograd's
    chain through both norms; a classifier whose logits received no gradient gets none (``None``, as autograd
    gives an unused layer)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float, eps: float, *weights: Tensor):
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(x)
        # the scale goes with ŵ, except in float16, where ŵ·x must stay below |x| (the range of x itself)
        w_scale, x_scale = (1.0, scale) if dtype == torch.float16 else (scale, 1.0)
        b = x.shape[0]
        with float32_math(x.device):
            if weights[0].dim() == 4:  # one stack [K, B, n, C] of K classifiers
                k, _, n, c = weights[0].shape
                w = upcast_half(weights[0].movedim(0, 1).reshape(b, k * n, c))  # a view for K = 1
                ctx.weights = [(n, weights[0].dtype)] * k
            else:
                w = upcast_half(weights[0] if len(weights) == 1 else torch.cat(weights, dim=1))
                ctx.weights = [(t.shape[1], t.dtype) for t in weights]
            w_norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)  # [B, M, 1]
            w_div = w_norm.clamp_min(eps)
            w_div = w_div.div_(w_scale) if w_scale != 1 else w_div  # ŵ = w / w_div
            w_hat = (w / w_div).to(dtype)
            x_c = x.to(dtype)
            x_norm = channel_norm(x.flatten(2)).view(x.shape[0], 1, *x.shape[2:])  # [B, 1, h, w], float32
            x_div = x_norm.clamp_min(eps)
            x_div = x_div.div_(x_scale) if x_scale != 1 else x_div
            out = classify_pixels(x_c, w_hat) / x_div  # float32 (float64 for float64 input)
        ctx.save_for_backward(x_c, w_hat, w_norm, w_div, x_norm, x_div, out)
        ctx.eps, ctx.scales, ctx.x_dtype, ctx.stacked = eps, (w_scale, x_scale), x.dtype, weights[0].dim() == 4
        if len(ctx.weights) == 1:
            return out
        return out.split([size for size, _ in ctx.weights], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        x_c, w_hat, w_norm, w_div, x_norm, x_div, out = ctx.saved_tensors
        if all(g is None for g in grads):
            return (None,) * (3 + len(grads))
        parts = [g if g is not None else out.new_zeros(()).expand(out.shape[0], size, *out.shape[2:])
                 for g, (size, _) in zip(grads, ctx.weights, strict=True)]  # fmt: skip
        own = len(parts) > 1  # the concatenation is this backward's own tensor: divided in place below
        grad = parts[0] if not own else torch.cat(parts, dim=1)
        needs_x = ctx.needs_input_grad[0]
        needs_w = any(ctx.needs_input_grad[3:])
        w_scale, x_scale = ctx.scales
        with float32_math(x_c.device):
            if needs_x:  # through 1 / max(‖x‖, eps): −x · Σ_M (g · out) / ‖x‖², where ‖x‖ > eps (before g is divided)
                coef = (grad * out).sum(dim=1, keepdim=True).div_(x_div.square())
                coef = coef.masked_fill_(x_norm <= ctx.eps, 0.0).to(x_c.dtype)
            # through out = z / max(‖x‖, eps): one logits-sized gradient alive at a time
            grad_z = (grad.div_(x_div) if own and grad.dtype == x_c.dtype else grad / x_div).to(x_c.dtype)
            del grad
            grad_x, grad_w_hat = _classify_pixels_backward(grad_z, x_c, w_hat, (needs_x, needs_w))
            del grad_z
            if needs_x:
                grad_x = grad_x.addcmul_(x_c, coef, value=-1.0 / x_scale**2).to(ctx.x_dtype)
            grad_ws: list[Tensor | None] = [None] * len(grads)
            if needs_w:  # through ŵ = scale · w / max(‖w‖, eps): the part along ŵ drops where ‖w‖ > eps
                grad_w_hat = upcast_half(grad_w_hat)
                w_unit = w_hat.to(grad_w_hat.dtype)
                along = torch.linalg.vecdot(w_unit, grad_w_hat).unsqueeze(-1)
                along = along.masked_fill_(w_norm <= ctx.eps, 0.0)
                grad_w = grad_w_hat.addcmul_(w_unit, along, value=-1.0 / w_scale**2).div_(w_div)
                if ctx.stacked:
                    size, dtype = ctx.weights[0]
                    return grad_x, None, None, grad_w.unflatten(1, (-1, size)).movedim(1, 0).to(dtype)
                blocks = grad_w.split([size for size, _ in ctx.weights], dim=1)
                grad_ws = [
                    None if g is None else block.to(dtype)
                    for g, block, (_, dtype) in zip(grads, blocks, ctx.weights, strict=True)
                ]
        return (grad_x, None, None, *grad_ws)


def cosine_logits(feat: Tensor, weight: Tensor, scale: float, *, eps: float = 1e-12) -> Tensor:
    """Scaled cosine similarity of every pixel to every class vector.

    ``out[b, k, i] = scale · <w_k/max(‖w_k‖, eps), x_i/max(‖x_i‖, eps)>``, computed as ``ŵ @ x / max(‖x‖, eps)``
    so no normalised copy of the feature map is made. All-zero pixels or rows give 0, never NaN. (The official
    code adds eps to the norm; for any non-zero vector the two agree to float32 precision.)

    Args:
        feat: ``[B, C, h, w]`` features.
        weight: ``[n, C]`` (shared by the batch) or ``[B, n, C]`` (one classifier per image).
        scale: the multiplier (CAC/SSA ``tau`` = 15).

    Returns:
        ``[B, n, h, w]`` logits in ``[-scale, scale]`` up to rounding (float32, or float64 for float64 input).

    Example:
        >>> feat = torch.tensor([[[[1.0]], [[0.0]]]])  # [B=1, C=2, 1, 1]: the pixel points along channel 0
        >>> cosine_logits(feat, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), scale=15.0).flatten().round(decimals=4)
        tensor([15.,  0.])
    """
    return cosine_logits_of(feat, [weight], scale, eps=eps)[0]


def cosine_logits_of(
    feat: Tensor, weights: Sequence[Tensor] | Tensor, scale: float, *, eps: float = 1e-12
) -> list[Tensor]:
    """:func:`cosine_logits` of ``feat`` under several classifiers (each ``[n_i, C]`` or ``[B, n_i, C]``, or one
    ``[K, B, n, C]`` stack of K) in one product that shares the feature norm: a head's student and teacher. One
    ``[B, n_i, h, w]`` tensor each (the first contiguous, the others views of one buffer)."""
    b = feat.shape[0]
    if isinstance(weights, Tensor):
        stacked = [weights]
    else:
        stacked = [w.expand(b, *w.shape) if w.dim() == 2 else w for w in weights]
    out = _CosineLogits.apply(feat, float(scale), float(eps), *stacked)
    out = list(out) if isinstance(out, tuple) else [out]
    return [out[0].contiguous(), *out[1:]]
