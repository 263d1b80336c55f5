"""The heads this library provides, by short name: the one place that lists them.

Each head class declares its own loss (``loss_type``), so a fourth head is one new module plus one line here;
tests, benchmarks, examples and integrations iterate over :data:`HEADS`.
"""

from __future__ import annotations

from .cac import ContextAwareClassifier
from .head import AdaptiveHead
from .protoseg import PrototypeClassifier
from .ssa import SSAClassifier

__all__ = ["HEADS", "head_by_name"]

HEADS: dict[str, type[AdaptiveHead]] = {
    "cac": ContextAwareClassifier,
    "ssa": SSAClassifier,
    "proto": PrototypeClassifier,
}


def head_by_name(name: str) -> type[AdaptiveHead]:
    """The head class for a short name (``"cac"``) or a class name (``"ContextAwareClassifier"``).

    Example:
        >>> head_by_name("ssa").__name__, head_by_name("PrototypeClassifier").__name__
        ('SSAClassifier', 'PrototypeClassifier')
    """
    for key, cls in HEADS.items():
        if name in (key, cls.__name__):
            return cls
    known = [k for k in HEADS] + [c.__name__ for c in HEADS.values()]
    raise ValueError(f"unknown head {name!r}; known: {known}")
