"""Shared fixtures: the heads come from the package's registry, never from a list of the tests' own."""

from __future__ import annotations

import pytest
import torch

from adaptive_heads import AdaptiveHead, HeadLoss, PrototypeClassifier
from adaptive_heads.registry import HEADS

#: the installed torch as (major, minor), for tests of capabilities younger than the supported floor
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])

#: test-size options by head class: fewer prototypes keep ProtoSeg's tests fast
FAST_OPTIONS: dict[type[AdaptiveHead], dict[str, object]] = {PrototypeClassifier: {"num_prototypes": 3}}


def make_head(name: str, in_channels: int, num_classes: int, **options: object) -> AdaptiveHead:
    """``HEADS[name](in_channels, num_classes)`` with the fast test options, overridden by ``options``."""
    cls = HEADS[name]
    return cls(in_channels, num_classes, **{**FAST_OPTIONS.get(cls, {}), **options})


def make_loss(name: str, **options: object) -> HeadLoss:
    """The head's own loss module (``loss_type``)."""
    return HEADS[name].loss_type(**options)


@pytest.fixture(params=list(HEADS), scope="session")
def head_name(request: pytest.FixtureRequest) -> str:
    """Every registered head, by short name."""
    return request.param
