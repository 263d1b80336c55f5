"""Deprecated names kept for one release (0.2), with a ``DeprecationWarning`` that says what replaces them."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["loss_function", "renamed_method"]


def warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in 0.3; use {new}", DeprecationWarning, stacklevel=3)


def loss_function(loss_type: type, name: str) -> Callable[..., dict[str, Tensor]]:
    """The 0.1 functional form of a loss module: ``name(out, target, **options)`` is
    ``loss_type(**options)(out, target)``."""

    def function(out: Any, target: Tensor, **options: Any) -> dict[str, Tensor]:
        warn(f"{name}()", f"{loss_type.__name__}(**options)(out, target)")
        return loss_type(**options)(out, target)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"Deprecated: ``{loss_type.__name__}(**options)(out, target)``."
    return function


def renamed_method(new: str, old: str) -> Callable[..., Any]:
    """A method ``old`` that forwards to ``new`` with a deprecation warning."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        warn(f"{type(self).__name__}.{old}()", f"{new}()")
        return getattr(self, new)(*args, **kwargs)

    method.__name__ = method.__qualname__ = old
    method.__doc__ = f"Deprecated alias of :meth:`{new}`."
    return functools.wraps(method)(method)
