"""Small layers of the heads: the cosine heads' projector, ProtoSeg's projection head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .functional.cosine import pointwise_conv

__all__ = ["ProjectionHead", "prototype_mlp", "stacked_linears", "stacked_mlps"]


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


def stacked_mlps(mlps: Sequence[nn.Sequential], pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``mlps[i](cat[first_i, second_i])`` for every :func:`prototype_mlp` ``i`` at once: ``[K, ..., C]``.

    The K projectors (CAC's estimated and oracle branches, SSA-Seg's four) run as three batched products over their
    stacked weights, with the same values as calling each (``first_i``, ``second_i``: ``[..., C]``, one shape for
    all; an expanded view is fine), in the projectors' own dtype (the pooled prototypes come in float32, a half
    model's projector is half). The weights stand on the left of each product, so their gradients come out in
    their own layout (no copy); the result is a strided view.

    Example:
        >>> mlps = [prototype_mlp(4), prototype_mlp(4)]
        >>> pairs = [(torch.randn(3, 4), torch.randn(3, 4)) for _ in mlps]
        >>> out = stacked_mlps(mlps, pairs)
        >>> torch.allclose(out[1], mlps[1](torch.cat(pairs[1], dim=-1)), atol=1e-6)
        True
    """
    layers = [(cast(nn.Linear, m[0]), cast(nn.Linear, m[2])) for m in mlps]
    dtype = layers[0][0].weight.dtype
    if len(mlps) == 1:  # inference: the one projector as it is
        return mlps[0](torch.cat([pairs[0][0].to(dtype), pairs[0][1].to(dtype)], dim=-1)).unsqueeze(0)
    shape = pairs[0][0].shape
    k = len(mlps)
    # [..., 2K, C] in one copy, read as [M, K, 2C]: each projector's input, the two halves side by side
    inputs = torch.stack([t for pair in pairs for t in pair], dim=-2).to(dtype).view(-1, k, 2 * shape[-1])
    w1 = torch.stack([first.weight for first, _ in layers])  # [K, C/2, 2C]
    w2 = torch.stack([second.weight for _, second in layers])  # [K, C, C/2]
    b2 = torch.stack([cast(Tensor, second.bias) for _, second in layers])  # [K, C]
    hidden = torch.bmm(w1, inputs.permute(1, 2, 0)).relu_()  # [K, C/2, M]
    out = torch.baddbmm(b2.unsqueeze(-1), w2, hidden)  # [K, C, M]
    return out.view(k, out.shape[1], *shape[:-1]).movedim(1, -1)


def stacked_linears(linears: Sequence[nn.Linear], inputs: Tensor) -> Tensor:
    """``linears[i](inputs[i])`` for bias-free linear layers of one shape, in one batched product (the weights on the
    left, as in :func:`stacked_mlps`): ``inputs [K, ..., C_in]`` → ``[K, ..., C_out]`` in the layers' dtype, a
    strided view."""
    if len(linears) == 1:
        return linears[0](inputs[0].to(linears[0].weight.dtype)).unsqueeze(0)
    weight = torch.stack([layer.weight for layer in linears])  # [K, C_out, C_in]
    flat = inputs.to(weight.dtype).movedim(-1, 1).reshape(len(linears), inputs.shape[-1], -1)  # [K, C_in, M]
    out = torch.bmm(weight, flat)  # [K, C_out, M]
    return out.view(len(linears), out.shape[1], *inputs.shape[1:-1]).movedim(1, -1)


class ProjectionHead(nn.Module):
    """``1×1 conv (C→C) → ReLU → 1×1 conv (C→D)``; named ``proj`` like the official ``proj_head.proj``."""

    def __init__(self, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(in_channels, embed_dim, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        conv1, relu, conv2 = cast(nn.Conv2d, self.proj[0]), self.proj[1], cast(nn.Conv2d, self.proj[2])
        return pointwise_conv(relu(pointwise_conv(x, conv1.weight, conv1.bias)), conv2.weight, conv2.bias)
