"""Small layers shared by the cosine-classifier heads."""

from __future__ import annotations

from torch import nn

__all__ = ["prototype_mlp"]


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
