"""The loss modules: one per head, and their base."""

from __future__ import annotations

from .base import HeadLoss
from .cac import ContextAwareLoss
from .protoseg import PrototypeLoss
from .ssa import SSALoss

__all__ = ["ContextAwareLoss", "HeadLoss", "PrototypeLoss", "SSALoss"]
