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
    model = replace_classifier(_model(), "cac", path="2", tau=10.0, teacher_pooling="image")
    assert (model[2].tau, model[2].teacher_pooling) == (10.0, "image")
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
    model = replace_classifier(_model(), "cac", path="2").train()
    with pytest.warns(UserWarning) as inside:
        model(torch.randn(1, 3, 4, 4))  # the head deep inside torch's Sequential
    assert record[0].filename == __file__ and inside[0].filename == __file__


COSINE_OPTIONS = {"tau": 15.0, "dropout": None, "ignore_index": 255, "eps": 1e-12, "init_std": 0.01, "kernel_size": 1,
                  "dilation": 1, "class_direction": "sum"}  # fmt: skip
LOSS_OPTIONS = {"ignore_index": 255, "weights": None, "reduction": "mean", "main_average": "valid"}
SIGNATURES = {
    "ContextAwareClassifier": {"teacher_pooling": "batch", **COSINE_OPTIONS},
    "SSAClassifier": {"teacher_pooling": "batch", **COSINE_OPTIONS},
    "PrototypeClassifier": {
        "num_prototypes": 10,
        "embed_dim": None,
        "gamma": 0.999,
        "sinkhorn_iters": 3,
        "sinkhorn_eps": 0.05,
        "update_prototypes": True,
        "update_assignment": "gumbel",
        "projection_norm": "channel",
        "sync": True,
        "ignore_index": 255,
        "init_std": 0.02,
        "checkpoint_embedding": False,
    },
    "ContextAwareLoss": {
        "distill_mode": "mixed",
        "distill_mix": 0.5,
        "class_average": "present",
        **LOSS_OPTIONS,
    },
    "SSALoss": {"distill_mix": 0.5, "relation_tau": 15.0, **LOSS_OPTIONS},
    "PrototypeLoss": {"ppc_temperature": 1.0, "class_weight": None, **LOSS_OPTIONS},
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_every_option_is_a_named_keyword_with_its_default(name):
    import inspect

    import adaptive_heads

    parameters = inspect.signature(getattr(adaptive_heads, name)).parameters
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # no hidden **options
    options = {k: p.default for k, p in parameters.items() if k not in ("in_channels", "num_classes") or "Loss" in name}
    assert options == SIGNATURES[name]


def test_supervise_computes_each_term_once_per_forward(monkeypatch):
    """``loss()`` computes the extra terms alone, ``losses()`` adds the main CE's value (no gradient) and
    ``loss(include_main=True)`` the main CE with its gradient: no term is computed twice for the same use."""
    from adaptive_heads import ContextAwareLoss

    model = replace_classifier(_model(), "cac", path="2").train()
    target = torch.randint(0, 4, (2, 8, 8))
    computed = []
    original = ContextAwareLoss.terms

    def terms(self, out, t, skip=()):
        values = original(self, out, t, skip)
        computed.extend((name, value.requires_grad) for name, value in values.items())
        return values

    monkeypatch.setattr(ContextAwareLoss, "terms", terms)
    with supervise(model, target) as sup:
        model(torch.randn(2, 3, 8, 8))
    total = sup.loss()
    assert sorted(name for name, _ in computed) == ["ce_coarse", "ce_teacher", "distill"]  # the main CE: not summed
    terms = sup.losses()
    assert computed[-1] == ("ce", False) and len(computed) == 4  # reported, without a graph
    assert sup.loss(include_main=True) is not None and computed[-1] == ("ce", True) and len(computed) == 5
    assert sup.losses()["2.ce"].requires_grad and len(computed) == 5  # all computed already
    assert torch.equal(terms["adaptive_loss"], total)  # the weighted sum is re-added (cheap), the terms are shared


def test_supervise_computes_the_extra_terms_as_the_head_returns(monkeypatch):
    """The extra terms are computed when the head records its output, before the modules after it run (where a
    segmenter upsamples its logits and the user takes the main CE): their full-resolution temporaries then come
    and go below the step's peak (benchmarks/bench_segmenter.py: the peak of a deeplabv3 step +1 % with CAC)."""
    from adaptive_heads import ContextAwareLoss

    model = nn.Sequential(*_model(), nn.Upsample(scale_factor=2.0, mode="bilinear"))
    model = replace_classifier(model, "cac", path="2").train()
    events = []
    original = ContextAwareLoss.terms
    monkeypatch.setattr(ContextAwareLoss, "terms", lambda *a, **k: events.append("terms") or original(*a, **k))
    model[3].register_forward_hook(lambda *_: events.append("upsample"))
    with supervise(model, torch.randint(0, 4, (2, 16, 16))) as sup:
        model(torch.randn(2, 3, 8, 8))
        assert events == ["terms", "upsample"]
        sup.loss()
    assert events == ["terms", "upsample"]  # computed once, reused by loss()


def test_a_term_weighted_zero_is_not_computed(monkeypatch):
    import adaptive_heads.losses.ssa as ssa_module
    from adaptive_heads import SSALoss

    def forbidden(*args, **kwargs):
        raise AssertionError("a term weighted 0 was computed")

    monkeypatch.setattr(ssa_module, "sigmoid_dice_losses", forbidden)
    model = replace_classifier(_model(), "ssa", path="2").train()
    target = torch.randint(0, 4, (2, 8, 8))
    loss_fn = SSALoss(weights={"dice": 0.0, "dice_teacher": 0.0})
    with supervise(model, target, loss_fns=loss_fn) as sup:
        model(torch.randn(2, 3, 8, 8))
    terms = sup.losses()
    assert "2.dice" not in terms and "2.ce" in terms and "2.relation" in terms  # the main term is always reported


@pytest.mark.parametrize(
    "weights",
    [{"a": 1.0}, {"a": 0.5}, {"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}, {"a": 10.0, "b": 0.4}],
)
def test_the_weighted_total_and_its_gradient(weights):
    """HeadLoss.combine: Σ weight·term over the weighted terms not excluded (a sum of adds for a few unit weights,
    one multiply for all otherwise), the gradient of each term its weight; 0 when nothing is weighted."""
    from adaptive_heads.losses import HeadLoss

    class Terms(HeadLoss):
        default_weights = dict.fromkeys(["a", "b", "c", "d", "off", "excluded"], 1.0)

    loss_fn = Terms(weights={**dict.fromkeys(Terms.default_weights, 0.0), **weights, "excluded": 1.0})
    values = {name: torch.tensor(float(i + 2), dtype=torch.float64, requires_grad=True) for i, name in
              enumerate([*weights, "off", "excluded"])}  # fmt: skip
    total = loss_fn.combine(values, exclude=["excluded"])
    assert total.item() == sum(w * values[name].item() for name, w in weights.items())
    total.backward()
    assert {name: v.grad for name, v in values.items() if v.grad is not None} == {
        name: torch.tensor(w, dtype=torch.float64) for name, w in weights.items()
    }
    assert torch.autograd.gradcheck(lambda *v: loss_fn.combine(dict(zip(weights, v, strict=True))),
                                    tuple(values[name] for name in weights))  # fmt: skip
    assert loss_fn.combine({"off": values["off"]}).item() == 0.0


# ----------------------------------------------------------------------------- one vocabulary
#: bilinear upsampling of each head's main CE, as its official code does it
MAIN_ALIGN_CORNERS = {"cac": False, "ssa": True, "proto": True}


@pytest.mark.parametrize("name", list(HEADS))
def test_ce_is_the_cross_entropy_of_the_logits_the_head_returns(name):
    torch.manual_seed(0)
    head = head_by_name(name)(8, 4, **({} if name == "proto" else {"dropout": 0.0}))
    feat, target = torch.randn(2, 8, 5, 6), torch.randint(0, 4, (2, 20, 24))
    out = head(feat, target)
    terms = head.default_loss()(out, target)
    up = nn.functional.interpolate(out.logits, size=(20, 24), mode="bilinear", align_corners=MAIN_ALIGN_CORNERS[name])
    torch.testing.assert_close(terms["ce"], nn.functional.cross_entropy(up, target))
    assert type(head.default_loss()).main_term == "ce"
    if name != "proto":  # and it is the prediction (ProtoSeg's eval sees the prototypes after the update)
        with torch.no_grad():
            torch.testing.assert_close(head.eval()(feat), out.logits.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_the_label_built_branch_has_one_name_in_both_cosine_heads(name):
    torch.manual_seed(0)
    head = head_by_name(name)(8, 4, teacher_pooling="image", dropout=0.0)
    feat, target = torch.randn(2, 8, 5, 6), torch.randint(0, 4, (2, 20, 24))
    out = head(feat, target)
    terms = head.default_loss()(out, target)
    assert {"ce", "ce_coarse", "ce_teacher", "distill"} <= set(terms)
    up = functools.partial(nn.functional.interpolate, size=(20, 24), mode="bilinear", align_corners=True)
    torch.testing.assert_close(terms["ce_teacher"], nn.functional.cross_entropy(up(out.teacher), target))
    torch.testing.assert_close(terms["ce_coarse"], nn.functional.cross_entropy(up(out.coarse), target))
    torch.testing.assert_close(out.coarse, head.conv_seg(feat))
    with pytest.raises(ValueError, match=r"unknown loss terms in weights: \['ce_oracle'\]"):
        type(head.default_loss())(weights={"ce_oracle": 0.0})
