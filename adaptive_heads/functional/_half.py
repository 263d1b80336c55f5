"""Matmuls with a feature map that stays in half precision.

Under bf16/fp16 (a half model, or autocast) the heads' feature-map-sized work must not keep float32 copies of the
features for backward. These two products take the features ``x [B, C, N]`` in their own dtype and everything else
in float32: the result and the gradients of the small operands are float32 (accumulated in float32, so neither
fp16's range nor its precision limits the pixel sums), the gradient of ``x`` comes back in ``x``'s dtype, and what
autograd keeps is ``x`` itself (the tensor the caller already holds, no copy) and the small operand. The float32
upcast happens one pixel chunk at a time.

Float32 and float64 features, and code traced by ``torch.compile``/``torch.export`` (the compiler plans its own
memory), take the plain ``torch.bmm``. The half path is differentiable once (no double backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import HALF_DTYPES, float32_math
from .._validation import is_tracing

__all__ = ["class_sums", "classify_pixels"]

#: elements of one float32 chunk of the features (16 MiB)
_CHUNK_ELEMENTS = 1 << 22


def _chunks(x: Tensor) -> list[slice]:
    step = max(256, _CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1]))  # at least 256 pixels a chunk
    return [slice(start, start + step) for start in range(0, x.shape[-1], step)]


def _half_path(x: Tensor) -> bool:
    return x.dtype in HALF_DTYPES and not is_tracing()


class _ClassSums(torch.autograd.Function):
    """``w [B, n, N] @ x [B, C, N]ᵀ`` → ``[B, n, C]`` float32, ``x`` half."""

    @staticmethod
    def forward(ctx, w: Tensor, x: Tensor) -> Tensor:
        out = w.new_zeros(w.shape[0], w.shape[1], x.shape[1])
        for part in _chunks(x):
            out.baddbmm_(w[:, :, part], x[:, :, part].float().transpose(1, 2))
        ctx.save_for_backward(w, x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, x = ctx.saved_tensors
        with float32_math(x.device):
            return _ClassSums._backward(ctx, grad.float(), w, x)

    @staticmethod
    def _backward(ctx, grad: Tensor, w: Tensor, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[0] else None
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        grad_t = grad.transpose(1, 2)  # [B, C, n]
        for part in _chunks(x):
            if grad_w is not None:
                grad_w[:, :, part] = torch.bmm(grad, x[:, :, part].float())
            if grad_x is not None:
                grad_x[:, :, part] = torch.bmm(grad_t, w[:, :, part])
        return grad_w, grad_x


class _ClassifyPixels(torch.autograd.Function):
    """``a [B or 1, n, C] @ x [B, C, N]`` → ``[B, n, N]`` float32, ``x`` half."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor) -> Tensor:
        out = a.new_empty(x.shape[0], a.shape[1], x.shape[2])
        for part in _chunks(x):
            out[:, :, part] = torch.matmul(a, x[:, :, part].float())
        ctx.save_for_backward(a, x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, x = ctx.saved_tensors
        with float32_math(x.device):
            return _ClassifyPixels._backward(ctx, grad.float(), a, x)

    @staticmethod
    def _backward(ctx, grad: Tensor, a: Tensor, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        needs_a, needs_x = ctx.needs_input_grad
        grad_a = a.new_zeros(x.shape[0], *a.shape[1:]) if needs_a else None
        grad_x = torch.empty_like(x) if needs_x else None
        a_t = a.transpose(1, 2)  # [B or 1, C, n]
        for part in _chunks(x):
            if grad_a is not None:
                grad_a.baddbmm_(grad[:, :, part], x[:, :, part].float().transpose(1, 2))
            if grad_x is not None:
                grad_x[:, :, part] = torch.matmul(a_t, grad[:, :, part])
        if grad_a is not None and a.shape[0] == 1:
            grad_a = grad_a.sum(dim=0, keepdim=True)
        return grad_a, grad_x


def class_sums(weights: Tensor, x: Tensor) -> Tensor:
    """``Σ_i weights[b, k, i] · x[b, :, i]``: ``weights [B, n, N]`` (any float, used in float32 or wider) and
    ``x [B, C, N]`` → ``[B, n, C]`` in float32 (float64 for float64 input).

    Example:
        >>> w, x = torch.rand(2, 3, 10), torch.randn(2, 4, 10)
        >>> torch.allclose(class_sums(w, x.bfloat16()), w @ x.bfloat16().float().transpose(1, 2), atol=1e-5)
        True
    """
    if not _half_path(x):
        x = x.float() if x.dtype in HALF_DTYPES else x
        with float32_math(x.device):
            return torch.bmm(weights.to(x.dtype), x.transpose(1, 2))
    with float32_math(x.device):
        return _ClassSums.apply(weights.float(), x)


def classify_pixels(classifier: Tensor, x: Tensor) -> Tensor:
    """``classifier @ x``: ``classifier [n, C]`` or ``[B, n, C]`` and ``x [B, C, N]`` → ``[B, n, N]`` in float32
    (float64 for float64 input).

    Example:
        >>> a, x = torch.randn(3, 4), torch.randn(2, 4, 10)
        >>> torch.allclose(classify_pixels(a, x.bfloat16()), a @ x.bfloat16().float(), atol=1e-5)
        True
    """
    if not _half_path(x):
        x = x.float() if x.dtype in HALF_DTYPES else x
        with float32_math(x.device):
            a = classifier.to(x.dtype)
            # bmm with an expanded [n, C] classifier: matmul would fold x into a [B·N, C] copy kept for backward
            return torch.bmm(a.expand(x.shape[0], -1, -1) if a.dim() == 2 else a, x)
    with float32_math(x.device):
        a = classifier.float()
        return _ClassifyPixels.apply(a if a.dim() == 3 else a.unsqueeze(0), x)
