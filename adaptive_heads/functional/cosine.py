"""Cosine classification of every pixel, the 1×1 conv as a matmul, and the channel norm they share."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .._layout import is_channels_last
from .._precision import float32_math, upcast_half
from .._validation import is_tracing
from ._half import classify_pixels

__all__ = ["channel_norm", "cosine_logits", "pointwise_conv"]


def pointwise_conv(feat: Tensor, weight: Tensor, bias: Tensor | None = None, channel_dropout: float = 0.0) -> Tensor:
    """A 1×1 convolution as one batched matmul ``W @ x + b``: ``[B, C, h, w]`` → ``[B, n, h, w]``.

    Same result as ``F.conv2d(feat, weight, bias)``; on CPU the matmul avoids the oneDNN layout conversions of a
    1×1 convolution (≈1.4× faster at C = 512). ``channel_dropout = p > 0`` gives the convolution of
    ``F.dropout2d(feat, p)`` (whole input channels zeroed per image, survivors scaled by ``1/(1-p)``) by scaling a
    per-image copy of the ``[n, C]`` weight instead of copying the feature map. Every memory format takes the same
    matmul path (so TF32 settings and rounding do not depend on the layout): a channels-last input is multiplied
    as ``[B, h·w, C] @ Wᵀ`` and gives a channels-last output; other strides are made contiguous first.

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
    b, c, h, w = feat.shape
    n = weight.shape[0]
    if weight.numel() != n * c:
        raise ValueError(f"weight must be [n, {c}] or [n, {c}, 1, 1] for these features, got {tuple(weight.shape)}")
    weight = weight.reshape(1, n, c)
    if channel_dropout > 0:
        keep = feat.new_empty(b, 1, c).bernoulli_(1.0 - channel_dropout).div_(1.0 - channel_dropout)
        weight = weight * keep.to(weight.dtype)
    else:
        weight = weight.expand(b, -1, -1)
    if is_channels_last(feat):
        x = feat.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: [B, N, C] with C contiguous
        wt = weight.transpose(1, 2)
        out = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.view(1, 1, -1), x, wt)
        return out.view(b, h, w, n).permute(0, 3, 1, 2)
    x = feat.contiguous().view(b, c, h * w)
    out = torch.bmm(weight, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, x)
    return out.view(b, n, h, w)


#: pixels per chunk of :func:`channel_norm` × channels (keeps each chunk in cache)
_NORM_CHUNK_ELEMENTS = 1 << 20


def _chunked_sq_norm(x: Tensor) -> Tensor:
    """``Σ_c x²`` ``[B, 1, N]`` in float32 (or wider), a half input upcast one pixel chunk at a time."""
    b, c, n = x.shape
    out = x.new_empty(b, 1, n, dtype=torch.promote_types(x.dtype, torch.float32))
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
    """L2 norm over the channel axis of ``[B, C, N]`` → ``[B, 1, N]`` (float32 for half input), in pixel chunks.

    Equal to ``torch.linalg.vector_norm(x, dim=1, keepdim=True)`` but several times faster on CPU (the strided
    reduction runs chunk by chunk in cache) and without an ``x²`` copy. The gradient at a zero vector is 0.
    Under ``torch.compile``/``torch.export``/tracing it is the single ``vector_norm`` op (shape-agnostic graphs).

    Example:
        >>> channel_norm(torch.tensor([[[3.0, 0.0], [4.0, 0.0]]]))  # [B=1, C=2, N=2]
        tensor([[[5., 0.]]])
    """
    if is_tracing():
        return torch.linalg.vector_norm(upcast_half(x), dim=1, keepdim=True)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChannelNorm.apply(x)
    return _chunked_sq_norm(x).sqrt_()


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
        ``[B, n, h, w]`` logits in ``[-scale, scale]`` (float32, or float64 for float64 input).

    Example:
        >>> feat = torch.tensor([[[[1.0]], [[0.0]]]])  # [B=1, C=2, 1, 1]: the pixel points along channel 0
        >>> cosine_logits(feat, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), scale=15.0).flatten()
        tensor([15.,  0.])
    """
    _b, _, h, w = feat.shape
    x = feat.flatten(2)  # [B, C, N], half features stay half (no float32 copy kept for backward)
    with float32_math(x.device):
        wt = upcast_half(weight).to(torch.promote_types(x.dtype, torch.float32))
        # max(‖·‖, eps) rather than ‖·‖ + eps: identical in float32 for any non-zero vector, and exporters cannot
        # fold it away (the ONNX exporter drops "+ 1e-12", turning all-zero pixels into NaN)
        w_hat = wt / torch.linalg.vector_norm(wt, dim=-1, keepdim=True).clamp_min(eps)
        inv_norm = scale / channel_norm(x).clamp_min(eps)  # [B, 1, N], float32
        logits = classify_pixels(w_hat, x) * inv_norm  # [n, C] or [B, n, C] @ [B, C, N] -> [B, n, N]
    return rearrange(logits, "b n (h w) -> b n h w", h=h, w=w)
