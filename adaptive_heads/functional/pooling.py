"""Class-wise pooling of a feature map: soft (under a probability map) and hard (under labels).

The pooling products run in the features' compute dtype (:func:`~adaptive_heads._precision.compute_dtype`: half
under autocast), accumulated in float32 by the GEMM libraries; the soft areas and pixel counts are float32 sums.
float16 is the exception: a sum over 400k pixels can exceed its range (65504), so float16 features are pooled in
float32 (one transient float32 copy of the features, not kept for backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import compute_dtype, float32_math, upcast_half

__all__ = [
    "class_means",
    "class_pixel_counts",
    "class_sums",
    "hard_class_pool",
    "label_one_hot",
    "soft_class_pool",
    "soft_class_sums",
]


class _Float32Sums(torch.autograd.Function):
    """``weights [B, n, N] @ x [B, C, N]ᵀ`` in float32 for float16 ``x``: what autograd keeps is ``x`` itself; its
    float32 copy is made again in backward."""

    @staticmethod
    def forward(ctx, weights: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(weights, x)
        return torch.bmm(weights, x.float().transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        weights, x = ctx.saved_tensors
        needs_w, needs_x = ctx.needs_input_grad
        grad_w = torch.bmm(grad, x.float()) if needs_w else None
        grad_x = torch.bmm(grad.transpose(1, 2), weights).to(x.dtype) if needs_x else None
        return grad_w, grad_x


class _SoftClassPool(torch.autograd.Function):
    """:func:`soft_class_pool` with its backward written out: ``out = (P Xᵀ) / (P 1 + eps)`` gives
    ``∂/∂X = Gᵀ P`` and ``∂/∂P = G X − (G ⊙ out) 1`` with ``G = grad / (P 1 + eps)`` (two products and a
    ``[B, n, 1]`` correction, where autograd's chain through the division and the area takes a dozen ops)."""

    @staticmethod
    def forward(ctx, probs: Tensor, x: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        wide = torch.float64 if probs.dtype == torch.float64 else torch.float32
        if dtype == torch.float16:  # a float16 sum over many pixels can overflow: the product in float32
            dtype = torch.float32
        p, x_c = probs.to(dtype), x.to(dtype)
        # out of place (small tensors): torch 2.4's export cannot trace in-place ops inside a Function's forward
        denom = probs.sum(dim=-1, keepdim=True, dtype=wide) + eps  # [B, n, 1]
        out = torch.bmm(p, x_c.transpose(1, 2)).to(wide) / denom  # [B, n, C]
        ctx.save_for_backward(probs, x, denom, out)  # the inputs, not their casts (alive in the graph anyway)
        ctx.dtypes = (probs.dtype, x.dtype, dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        p, x, denom, out = ctx.saved_tensors
        probs_dtype, x_dtype, dtype = ctx.dtypes
        needs_p, needs_x = ctx.needs_input_grad[:2]
        with float32_math(grad.device):
            g = grad / denom  # [B, n, C]
            g_c = g.to(dtype)
            grad_p = grad_x = None
            if needs_p:  # G X − (G ⊙ out) 1, the correction broadcast over the pixels
                correction = torch.linalg.vecdot(g, out).unsqueeze(-1).to(dtype)
                grad_p = torch.baddbmm(correction, g_c, x.to(dtype), beta=-1).to(probs_dtype)
            if needs_x:
                grad_x = torch.bmm(g_c.transpose(1, 2), p.to(dtype)).to(x_dtype)
        return grad_p, grad_x, None, None


def class_sums(weights: Tensor, x: Tensor) -> Tensor:
    """``Σ_i weights[b, k, i] · x[b, :, i]``: ``weights [B, n, N]`` and ``x [B, C, N]`` → ``[B, n, C]`` in float32
    (float64 for float64 input), the product in the compute dtype of ``x`` (float32 for float16).

    Example:
        >>> w, x = torch.rand(2, 3, 10), torch.randn(2, 4, 10)
        >>> torch.allclose(class_sums(w, x), w @ x.transpose(1, 2))
        True
    """
    dtype = compute_dtype(x)
    with float32_math(x.device):
        if dtype == torch.float16:
            return _Float32Sums.apply(weights.float(), x)
        # x first: the gradient of x comes out contiguous, [B, C, N] (the transposed product would need a copy)
        sums = torch.bmm(x.to(dtype), weights.to(dtype).transpose(1, 2)).transpose(1, 2)
        return upcast_half(sums)


def soft_class_sums(probs: Tensor, feat: Tensor) -> tuple[Tensor, Tensor]:
    """Soft class sums and soft areas, the additive statistics behind :func:`soft_class_pool` (one batched matmul).

    ``sums[b, k] = Σ_i probs[b, k, i] · feat[b, :, i]``, ``area[b, k] = Σ_i probs[b, k, i]``: sums over disjoint
    pixel sets add up, so an image's statistics can be gathered tile by tile.

    Args:
        probs: ``[B, n, h, w]`` or ``[B, n, N]`` non-negative weights.
        feat: ``[B, C, h, w]`` or ``[B, C, N]`` features, same pixel count.

    Returns:
        ``(sums [B, n, C], area [B, n])`` in float32 (float64 if the inputs are float64).

    Example:
        >>> probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # [B=1, n=2, N=2]
        >>> sums, area = soft_class_sums(probs, torch.tensor([[[2.0, 4.0]]]))  # feat [B=1, C=1, N=2]
        >>> sums.squeeze(-1), area
        (tensor([[2., 3.]]), tensor([[1., 1.]]))
    """
    probs, feat = probs.flatten(2), feat.flatten(2)
    area = probs.sum(dim=-1, dtype=torch.float64 if probs.dtype == torch.float64 else torch.float32)
    return class_sums(probs, feat), area


def soft_class_pool(probs: Tensor, feat: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Soft-area-weighted class means: one batched matmul.

    ``out[b, k] = Σ_i probs[b, k, i] · feat[b, :, i] / (Σ_i probs[b, k, i] + eps)``

    Args:
        probs: ``[B, n, h, w]`` or ``[B, n, N]`` non-negative weights (e.g. ``softmax(p, dim=1)``).
        feat: ``[B, C, h, w]`` or ``[B, C, N]`` features, same pixel count.
        eps: added to the soft area (the official ``1e-12``).

    Returns:
        ``[B, n, C]`` in float32 (float64 if the inputs are float64).

    Example:
        >>> probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # 2 classes, 2 pixels
        >>> feat = torch.tensor([[[2.0, 4.0]]])  # 1 channel
        >>> soft_class_pool(probs, feat).squeeze(-1)
        tensor([[2., 3.]])
    """
    probs, feat = probs.flatten(2), feat.flatten(2)
    dtype = compute_dtype(feat)  # asked before autocast is turned off for the float32 parts
    with float32_math(feat.device):
        return _SoftClassPool.apply(probs, feat, float(eps), dtype)


def label_one_hot(labels: Tensor, num_classes: int, ignore_index: int | None, dtype: torch.dtype) -> Tensor:
    """One-hot class masks with ignored (and out-of-range) pixels all zero.

    Args:
        labels: ``[B, h, w]`` or ``[B, N]`` integer labels.

    Returns:
        ``[B, n, N]`` tensor of ``dtype`` with ``out[b, k, i] = 1[labels[b, i] == k]``.

    Example:
        >>> label_one_hot(torch.tensor([[0, 2, 255]]), 3, 255, torch.float32)
        tensor([[[1., 0., 0.],
                 [0., 0., 0.],
                 [0., 1., 0.]]])
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, *([1] * (labels.dim() - 1)))
    mask = labels.unsqueeze(1) == classes  # [B, n, ...], contiguous whatever the strides of labels
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        mask = mask & (labels != ignore_index).unsqueeze(1)
    return mask.to(dtype).flatten(2)


def class_pixel_counts(labels: Tensor, num_classes: int, valid: Tensor) -> Tensor:
    """Pixels of each class in each image, ``[B, n]`` float32, without an ``[B, n, N]`` one-hot.

    Args:
        labels: ``[B, ...]`` integer labels.
        valid: ``[B, ...]`` bool (or a 0/1 float mask); invalid pixels are not counted.

    Example:
        >>> labels = torch.tensor([[0, 2, 2, 255]])
        >>> class_pixel_counts(labels, 3, labels != 255)
        tensor([[1., 0., 2.]])
    """
    b = labels.shape[0]
    slot = labels.reshape(b, -1).clamp(0, num_classes - 1)  # an invalid pixel adds 0 to any class
    counts = torch.zeros(b, num_classes, device=labels.device)
    return counts.scatter_add_(1, slot, valid.reshape(b, -1).to(counts.dtype))  # exact below 2^24 pixels


def hard_class_pool(
    feat: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    per_image: bool = True,
    one_hot: Tensor | None = None,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-class sums and pixel counts of ``feat`` under hard labels (one one-hot matmul).

    Args:
        feat: ``[B, C, h, w]`` features.
        labels: ``[B, h, w]`` integer labels at the feature resolution (ignored pixels join no class).
        num_classes: n.
        ignore_index: label value to skip (``None``: nothing is ignored).
        per_image: ``True`` → statistics per image; ``False`` → pooled over the whole batch.
        one_hot: the ``[B, n, N]`` output of :func:`label_one_hot` for these labels, and ``counts`` its per-image
            pixel counts ``[B, n]``, to share them between several poolings of the same labels.

    Returns:
        ``(sums, counts)``: ``[B, n, C]`` and ``[B, n]`` if ``per_image`` else ``[n, C]`` and ``[n]``;
        float32 (float64 for float64 input). The mean is ``sums / counts`` where ``counts > 0``.

    Example:
        >>> feat = torch.arange(4.0).view(1, 1, 2, 2)  # one channel: 0 1 / 2 3
        >>> labels = torch.tensor([[[0, 1], [1, 255]]])
        >>> sums, counts = hard_class_pool(feat, labels, 2)
        >>> sums.squeeze(-1), counts
        (tensor([[0., 3.]]), tensor([[1., 2.]]))
    """
    x = feat.flatten(2)  # half features stay half
    if one_hot is None:
        one_hot = label_one_hot(labels, num_classes, ignore_index, compute_dtype(x))  # [B, n, N]: 0/1 in any dtype
    sums = class_sums(one_hot, x)  # [B, n, C]
    if per_image:
        return sums, one_hot.sum(dim=-1, dtype=sums.dtype) if counts is None else counts
    pooled = one_hot.sum(dim=(0, 2), dtype=sums.dtype) if counts is None else counts.sum(dim=0)
    return sums.sum(dim=0), pooled


def class_means(sums: Tensor, counts: Tensor, fallback: Tensor) -> Tensor:
    """Per-class means from :func:`hard_class_pool`, with ``fallback`` rows for classes without pixels.

    Args:
        sums: ``[..., n, C]``; counts: ``[..., n]``; fallback: ``[n, C]`` (broadcast; the official heads pass a
            detached classifier or basis row).

    Example:
        >>> sums, counts = torch.tensor([[4.0], [0.0]]), torch.tensor([2.0, 0.0])
        >>> class_means(sums, counts, fallback=torch.tensor([[9.0], [7.0]]))  # class 1 has no pixel
        tensor([[2.],
                [7.]])
    """
    fallback = fallback.to(sums.dtype).expand_as(sums)
    return torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), fallback)
