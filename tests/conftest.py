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


def assert_dropout_on_the_coarse_path_only(model, forward, target, paths) -> None:
    """Two training forwards of the same input (``forward()``) inside ``supervise``: at each head path the
    label-built logits (CAC's oracle, SSA-Seg's teacher) are identical and the coarse logits differ, i.e. the dropout
    acts on the coarse path only. BatchNorm normalises both forwards with the same batch statistics."""
    from adaptive_heads import supervise

    model.train()
    outputs = []
    for _ in range(2):
        with supervise(model, target) as sup:
            forward()
        outputs.append(sup.outputs)
    for path in paths:
        first, second = outputs[0][path][0], outputs[1][path][0]
        torch.testing.assert_close(first.teacher, second.teacher, rtol=0, atol=0)  # the label-built branch
        assert not torch.equal(first.coarse, second.coarse), path
