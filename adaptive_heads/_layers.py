"""Small layers of the heads: the cosine heads' projector, ProtoSeg's projection head."""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from .functional.cosine import pointwise_conv

__all__ = ["ProjectionHead", "prototype_mlp"]


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
