"""Shared math of every adaptive head: pooling, cosine logits, label resizing, class-wise reductions.

Notation used in all docstrings: ``B`` images, ``C`` feature channels, ``n`` classes, ``h×w`` feature
resolution (``N = h·w`` pixels), ``H×W`` label resolution.

Everything here is loop-free over classes and images and free of host synchronisation, so it runs
unchanged on CPU and CUDA, under ``torch.compile`` and ``torch.export``. Reductions over pixels
(pooling, the cosine normaliser, soft-maxes feeding a pooling) are done in float32 even under
autocast: a sum over 400k pixels overflows float16.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ._precision import float32_math, upcast_half
from .upsampled_ce import bilinear_source_rows, upsampled_cross_entropy
from .validation import check_choice, is_tracing

__all__ = [
    "bilinear_source_rows",
    "channel_norm",
    "class_means",
    "class_pixel_counts",
    "classwise_weighted_mean",
    "cosine_logits",
    "float32_math",
    "hard_class_pool",
    "label_one_hot",
    "pointwise_conv",
    "prototype_mlp",
    "resize_labels_nearest",
    "soft_class_pool",
    "soft_distillation",
    "upcast_half",
    "upsampled_cross_entropy",
]


def prototype_mlp(channels: int, hidden: int | None = None) -> nn.Sequential:
    """The projector shared by CAC and SSA-Seg: ``Linear(2C→C/2, no bias) → ReLU → Linear(C/2→C)``.

    Input ``[..., 2C]`` (a prototype concatenated with a classifier/basis row), output ``[..., C]``.
    The indices 0/1/2 match the official checkpoints' keys (``proj.0.weight`` ...).
    """
    hidden = max(1, channels // 2) if hidden is None else hidden
    return nn.Sequential(
        nn.Linear(2 * channels, hidden, bias=False),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, channels),
    )


def pointwise_conv(feat: Tensor, conv: nn.Conv2d, channel_dropout: float = 0.0) -> Tensor:
    """Apply a 1×1 ``conv`` as one batched matmul ``W @ x + b`` (``[B, C, h, w]`` → ``[B, n, h, w]``).

    Same result as ``conv(feat)``; on CPU the matmul avoids the oneDNN layout conversions of a 1×1
    convolution (≈1.4× faster at C = 512). ``channel_dropout = p > 0`` gives ``conv(F.dropout2d(feat, p))``
    (whole input channels zeroed per image, survivors scaled by ``1/(1-p)``) by scaling a per-image copy of the
    ``[n, C]`` weight instead of copying the feature map. Every memory format takes the same matmul path (so
    TF32 settings and rounding do not depend on the layout): a channels-last input is multiplied as
    ``[B, h·w, C] @ Wᵀ`` and gives a channels-last output; other strides are made contiguous first.
    """
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        return conv(F.dropout2d(feat, channel_dropout) if channel_dropout > 0 else feat)
    b, c, h, w = feat.shape
    weight = conv.weight.reshape(1, conv.out_channels, c)
    if channel_dropout > 0:
        keep = feat.new_empty(b, 1, c).bernoulli_(1.0 - channel_dropout).div_(1.0 - channel_dropout)
        weight = weight * keep.to(weight.dtype)
    else:
        weight = weight.expand(b, -1, -1)
    bias = conv.bias
    if _is_channels_last(feat):
        x = feat.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: [B, N, C] with C contiguous
        wt = weight.transpose(1, 2)
        out = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.view(1, 1, -1), x, wt)
        return out.view(b, h, w, conv.out_channels).permute(0, 3, 1, 2)
    x = feat.contiguous().view(b, c, h * w)
    out = torch.bmm(weight, x) if bias is None else torch.baddbmm(bias.view(1, -1, 1), weight, x)
    return out.view(b, conv.out_channels, h, w)


def _is_channels_last(feat: Tensor) -> bool:
    """A channels-last-strided ``[B, C, h, w]`` that is not also plain contiguous (``C = 1`` or ``h·w = 1``)."""
    return not feat.is_contiguous() and feat.is_contiguous(memory_format=torch.channels_last)


#: pixels per chunk of :func:`channel_norm` × channels (keeps each chunk in cache)
_NORM_CHUNK_ELEMENTS = 1 << 20


def _chunked_sq_norm(x: Tensor) -> Tensor:
    b, c, n = x.shape
    out = x.new_empty(b, 1, n)
    step = max(1, _NORM_CHUNK_ELEMENTS // max(1, c))
    for start in range(0, n, step):
        out[:, :, start : start + step] = x[:, :, start : start + step].square().sum(1, keepdim=True)
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
        return x * scale


def channel_norm(x: Tensor) -> Tensor:
    """L2 norm over the channel axis of ``[B, C, N]`` → ``[B, 1, N]``, in pixel chunks.

    Equal to ``torch.linalg.vector_norm(x, dim=1, keepdim=True)`` but several times faster on CPU (the strided
    reduction runs chunk by chunk in cache) and without an ``x²`` copy. The gradient at a zero vector is 0.
    Under ``torch.compile``/``torch.export``/tracing it is the single ``vector_norm`` op (shape-agnostic graphs).
    """
    if is_tracing():
        return torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChannelNorm.apply(x)
    return _chunked_sq_norm(x).sqrt_()


def soft_class_pool(probs: Tensor, feat: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Soft-area-weighted class means: one batched matmul.

    ``out[b, k] = Σ_i probs[b, k, i] · feat[b, :, i] / (Σ_i probs[b, k, i] + eps)``

    Args:
        probs: ``[B, n, h, w]`` or ``[B, n, N]`` non-negative weights (e.g. ``softmax(p, dim=1)``).
        feat: ``[B, C, h, w]`` or ``[B, C, N]`` features, same pixel count.
        eps: added to the soft area (the official ``1e-12``).

    Returns:
        ``[B, n, C]`` in float32 (float64 if the inputs are float64).
    """
    probs = upcast_half(probs.flatten(2))
    feat = upcast_half(feat.flatten(2))
    with float32_math(feat.device):
        probs = probs.to(feat.dtype)
        area = probs.sum(dim=-1, keepdim=True)  # [B, n, 1]
        return torch.bmm(probs, feat.transpose(1, 2)) / (area + eps)


def label_one_hot(labels: Tensor, num_classes: int, ignore_index: int | None, dtype: torch.dtype) -> Tensor:
    """One-hot class masks with ignored (and out-of-range) pixels all zero.

    Args:
        labels: ``[B, h, w]`` or ``[B, N]`` integer labels.

    Returns:
        ``[B, n, N]`` tensor of ``dtype`` with ``out[b, k, i] = 1[labels[b, i] == k]``.
    """
    flat = labels.flatten(1)
    classes = torch.arange(num_classes, device=labels.device)
    mask = flat.unsqueeze(1) == classes.view(1, -1, 1)
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        mask = mask & (flat != ignore_index).unsqueeze(1)
    return mask.to(dtype)


def class_pixel_counts(labels: Tensor, num_classes: int, valid: Tensor) -> Tensor:
    """Pixels of each class in each image, ``[B, n]`` float32, without an ``[B, n, N]`` one-hot.

    Args:
        labels: ``[B, ...]`` integer labels.
        valid: ``[B, ...]`` bool; invalid pixels are not counted.
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1)
    slot = torch.where(valid.reshape(b, -1), flat, torch.full_like(flat, num_classes))
    slot = slot + (num_classes + 1) * torch.arange(b, device=labels.device).unsqueeze(1)
    counts = torch.zeros(b * (num_classes + 1), device=labels.device)
    counts.index_add_(0, slot.reshape(-1), torch.ones(slot.numel(), device=labels.device))
    return counts.view(b, num_classes + 1)[:, :num_classes]


def hard_class_pool(
    feat: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    per_image: bool = True,
    one_hot: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-class sums and pixel counts of ``feat`` under hard labels (one one-hot matmul).

    Args:
        feat: ``[B, C, h, w]`` features.
        labels: ``[B, h, w]`` integer labels at the feature resolution (ignored pixels join no class).
        num_classes: n.
        ignore_index: label value to skip (``None``: nothing is ignored).
        per_image: ``True`` → statistics per image; ``False`` → pooled over the whole batch.
        one_hot: the ``[B, n, N]`` output of :func:`label_one_hot` for these labels, to share it between
            several poolings of the same labels.

    Returns:
        ``(sums, counts)``: ``[B, n, C]`` and ``[B, n]`` if ``per_image`` else ``[n, C]`` and ``[n]``;
        float32 (float64 for float64 input). The mean is ``sums / counts`` where ``counts > 0``.
    """
    x = upcast_half(feat.flatten(2))
    with float32_math(x.device):
        if one_hot is None:
            one_hot = label_one_hot(labels, num_classes, ignore_index, x.dtype)  # [B, n, N]
        one_hot = one_hot.to(x.dtype)
        sums = torch.bmm(one_hot, x.transpose(1, 2))  # [B, n, C]
        counts = one_hot.sum(dim=-1)  # [B, n]
        if not per_image:
            sums, counts = sums.sum(dim=0), counts.sum(dim=0)
    return sums, counts


def class_means(sums: Tensor, counts: Tensor, fallback: Tensor) -> Tensor:
    """Per-class means from :func:`hard_class_pool`, with ``fallback`` rows for classes without pixels.

    Args:
        sums: ``[..., n, C]``; counts: ``[..., n]``; fallback: ``[n, C]`` (broadcast; the official heads pass a
            detached classifier or basis row).
    """
    fallback = fallback.to(sums.dtype).expand_as(sums)
    return torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp_min(1).unsqueeze(-1), fallback)


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
    """
    _b, _, h, w = feat.shape
    x = upcast_half(feat.flatten(2))  # [B, C, N]
    with float32_math(x.device):
        wt = upcast_half(weight).to(x.dtype)
        # max(‖·‖, eps) rather than ‖·‖ + eps: identical in float32 for any non-zero vector, and exporters cannot
        # fold it away (the ONNX exporter drops "+ 1e-12", turning all-zero pixels into NaN)
        w_hat = wt / torch.linalg.vector_norm(wt, dim=-1, keepdim=True).clamp_min(eps)
        inv_norm = scale / channel_norm(x).clamp_min(eps)  # [B, 1, N]
        if w_hat.dim() == 2:
            logits = torch.matmul(w_hat, x)  # [n, C] @ [B, C, N] -> [B, n, N]
        else:
            logits = torch.bmm(w_hat, x)
        logits = logits * inv_norm
    return rearrange(logits, "b n (h w) -> b n h w", h=h, w=w)


def _nearest_source_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """Source indices of PyTorch's legacy ``nearest`` mode: ``min(floor(i · in/out), in - 1)`` in float32."""
    if out_size == in_size:
        return torch.arange(out_size, device=device)
    scale = float(np.float32(in_size / out_size))  # the float32 scale of PyTorch's kernel, a host constant
    idx = torch.floor(torch.arange(out_size, dtype=torch.float32, device=device) * scale).long()
    return idx.clamp_max(in_size - 1)


def resize_labels_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize an integer label map like ``F.interpolate(labels.float(), size, mode="nearest")``.

    Legacy nearest takes the top-left sample of each block (source index ``floor(i·H/h)``) for
    downsampling — not a majority vote, not the block centre. Works on the integer tensor directly
    (no float copy, exact for any label value).

    Args:
        labels: ``[B, H, W]`` integer labels.
        size: ``(h, w)``.

    Returns:
        ``[B, h, w]`` labels, same dtype.
    """
    h, w = size
    if labels.shape[-2:] == (h, w):
        return labels
    rows = _nearest_source_index(h, labels.shape[-2], labels.device)
    cols = _nearest_source_index(w, labels.shape[-1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def classwise_weighted_mean(
    values: Tensor,
    weights: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    average: str = "present",
    eps: float = 1e-12,
) -> Tensor:
    """Class-balanced weighted mean over all pixels of a batch (no loop, no host sync).

    ``L = 1/(|K| + eps) · Σ_{k∈K} Σ_i 1[t_i=k]·w_i·ℓ_i / (Σ_i 1[t_i=k]·w_i + eps)``, with K the classes
    present in ``labels`` (``average="present"``, the official CAC/SSA code) or all n classes
    (``average="all"``, CAC paper Eq. 11). An empty K gives exactly 0 (differentiably).

    Args:
        values: ``[...]`` per-pixel losses ℓ, any shape.
        weights: ``[...]`` per-pixel weights w, same shape.
        labels: ``[...]`` integer class per pixel, same shape.

    Returns:
        A scalar tensor (float32, or float64 for float64 input).
    """
    check_choice("average", average, ("present", "all"))
    v = upcast_half(values).reshape(-1)
    wt = upcast_half(weights).reshape(-1).to(v.dtype)
    flat = labels.reshape(-1)
    valid = (flat >= 0) & (flat < num_classes)
    if ignore_index is not None:
        valid &= flat != ignore_index
    slot = torch.where(valid, flat, torch.full_like(flat, num_classes))  # ignored pixels: an extra bin
    with float32_math(v.device):
        columns = torch.stack([wt * v, wt, torch.ones_like(wt)], dim=-1)
        stats = v.new_zeros(num_classes + 1, 3).index_add_(0, slot, columns)[:num_classes]
        per_class = stats[:, 0] / (stats[:, 1] + eps)
        if average == "all":
            return per_class.sum() / num_classes
        present = (stats[:, 2] > 0).to(v.dtype)
        return (per_class * present).sum() / (present.sum() + eps)


def soft_distillation(
    student: Tensor,
    teacher: Tensor,
    feature_target: Tensor,
    *,
    ignore_index: int | None = 255,
    mix: float = 0.5,
    mode: str = "mixed",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel distillation loss and teacher-entropy weight (CAC's and SSA-Seg's response distillation).

    With ``q = softmax(teacher)`` (teacher detached here):

    - ``mode="mixed"`` (official code of both): ``ℓ = -Σ_j s_j log softmax(student)_j`` with
      ``s = mix·q + (1-mix)·onehot(t)`` — a soft cross-entropy, not a KL;
    - ``mode="kl"`` (CAC paper Eq. 10): ``ℓ = KL(q ‖ softmax(student))``.

    Args:
        student: ``[B, n, h, w]`` logits (receive gradient).
        teacher: ``[B, n, h, w]`` logits.
        feature_target: ``[B, h, w]`` labels at the logits' resolution.

    Returns:
        ``(loss, entropy, valid)``, each ``[B, h, w]``: ``ℓ``, the teacher entropy ``H(q)`` (0 on ignored
        pixels) and the valid-pixel mask; float32 (float64 for float64 input).
    """
    check_choice("mode", mode, ("mixed", "kl"))
    n = student.shape[1]
    with float32_math(student.device):
        log_p = torch.log_softmax(upcast_half(student), dim=1)
        log_q = torch.log_softmax(upcast_half(teacher.detach()), dim=1).to(log_p.dtype)
        q = log_q.exp()
        valid = (feature_target >= 0) & (feature_target < n)
        if ignore_index is not None:
            valid &= feature_target != ignore_index
        entropy = -(q * log_q).sum(dim=1) * valid
        if mode == "mixed":
            safe = torch.where(valid, feature_target, torch.zeros_like(feature_target))
            hard = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
            loss = -(mix * (q * log_p).sum(dim=1) + (1.0 - mix) * hard)
        else:
            loss = (q * (log_q - log_p)).sum(dim=1)
    return loss, entropy, valid
