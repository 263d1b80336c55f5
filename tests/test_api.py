"""The public API's first-hour behaviour: choosing a head by name, and a loud missing ``supervise``."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from adaptive_heads import ContextAwareClassifier, SSAClassifier, head_by_name, replace_classifier, supervise
from adaptive_heads.registry import HEADS


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize(
    "head",
    [
        "ssa",
        "SSAClassifier",
        SSAClassifier,
        functools.partial(SSAClassifier, tau=10.0),
        lambda c, n: SSAClassifier(c, n),
    ],
)
def test_replace_classifier_takes_a_name_a_class_or_a_callable(head):
    model = replace_classifier(_model(), head, path="2")
    assert isinstance(model[2], SSAClassifier)


def test_replace_classifier_passes_the_heads_options():
    model = replace_classifier(_model(), "cac", path="2", tau=10.0, oracle_pooling="image")
    assert (model[2].tau, model[2].oracle_pooling) == (10.0, "image")
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        replace_classifier(_model(), "cac", path="2", nope=1)
    with pytest.raises(ValueError, match=r"unknown head 'casc'; known: \['cac', 'ssa', 'proto'"):
        replace_classifier(_model(), "casc", path="2")
    with pytest.raises(TypeError, match="head must be a head name, a head class or a callable, got int"):
        replace_classifier(_model(), 3, path="2")
    assert head_by_name("proto") is HEADS["proto"]


@pytest.mark.parametrize("name", list(HEADS))
def test_training_without_supervise_warns_once(name):
    model = replace_classifier(_model(), name, path="2").train()
    images = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="training mode with gradients but without labels: no supervise"):
        model(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(images)  # once per head
        fresh = replace_classifier(_model(), name, path="2").train()
        with supervise(fresh, torch.randint(0, 4, (2, 8, 8))):
            fresh(images)  # labels given: no warning
        with torch.no_grad():
            fresh(images)  # no gradients: not training
        fresh.eval()(images)
        quiet = replace_classifier(_model(), name, path="2").train()
        quiet[2].warn_unsupervised = False  # deliberate
        quiet(images)


def test_the_warning_points_at_the_users_call():
    head = ContextAwareClassifier(8, 4).train()
    with pytest.warns(UserWarning) as record:
        head(torch.randn(1, 8, 4, 4))
    assert record[0].filename == __file__
