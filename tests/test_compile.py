"""torch.compile with its default backend (inductor): every head and every custom autograd Function compiles
without graph breaks and gives the eager values and gradients (float32, 1e-5)."""

import copy

import pytest
import torch

from adaptive_heads import PrototypeClassifier, replace_classifier, slide_inference
from adaptive_heads.functional import (
    channel_norm,
    prototype_contrast_sums,
    prototype_similarity_stats,
    unit_layer_norm,
    upsampled_cross_entropy,
    upsampled_sigmoid_stats,
)
from adaptive_heads.registry import HEADS

from .conftest import make_head, make_loss
from .models import TinyFCN


def compile_options(name: str) -> dict:
    """Dropout off (random masks differ between eager and inductor); ProtoSeg with the argmax assignment, so the
    momentum update is compared too (Gumbel draws differ between eager and inductor RNG)."""
    return {"update_assignment": "argmax"} if HEADS[name] is PrototypeClassifier else {"dropout": 0.0}


TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_grads_equal(compiled: torch.nn.Module, eager: torch.nn.Module) -> None:
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=False):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)


def test_inductor_eval_and_training_match_eager(head_name):
    torch.manual_seed(0)
    head = make_head(head_name, 16, 5, **compile_options(head_name))
    twin = copy.deepcopy(head)
    feat = torch.randn(2, 16, 6, 7)
    target = torch.randint(0, 5, (2, 24, 28))
    target[1, :4] = 255

    head.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(twin, fullgraph=True)(feat), head(feat), **TOL)

    head.train(), twin.train()
    loss_fn = make_loss(head_name)

    def step(module, f, t):
        out = module(f, t)
        return out.logits, loss_fn(out, t)["loss"]

    f_eager = feat.clone().requires_grad_(True)
    f_comp = feat.clone().requires_grad_(True)
    logits, loss = step(head, f_eager, target)
    (loss + logits.square().mean()).backward()
    c_logits, c_loss = torch.compile(step, fullgraph=True)(twin, f_comp, target)
    (c_loss + c_logits.square().mean()).backward()
    torch.testing.assert_close(c_logits, logits, **TOL)
    torch.testing.assert_close(c_loss, loss, **TOL)
    torch.testing.assert_close(f_comp.grad, f_eager.grad, **TOL)
    assert f_comp.grad.stride() == f_eager.grad.stride()
    assert_grads_equal(twin, head)
    for (key, a), b in zip(head.state_dict().items(), twin.state_dict().values(), strict=False):
        torch.testing.assert_close(b, a, **TOL, msg=key)  # ProtoSeg: the momentum-updated prototypes


def test_protoseg_gradient_under_inductor_issue_repro():
    """The review's reproduction: ``head(x).square().sum()`` through inductor, against eager."""
    torch.manual_seed(0)
    head = PrototypeClassifier(32, 5, num_prototypes=3)
    x = torch.randn(2, 32, 8, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    head(x1).square().sum().backward()
    torch.compile(head, fullgraph=True)(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, **TOL)


def _functions():
    """Each custom autograd Function of the package as ``(fn, inputs with gradient)``."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 17, 23), generator=g)
    target[0, :3] = 255
    valid = target != 255
    safe = torch.where(valid, target, 0)
    emb = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (30,), generator=g)
    proto_target = torch.where(labels > 0, labels * 3 + 1, -1)
    y = torch.randn(2, 8, 3, 5, generator=g)
    w, b = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    return {
        "upsampled_cross_entropy": (
            lambda z: upsampled_cross_entropy(z, target, align_corners=True, tile_elements=200),
            (logits,),
        ),
        "upsampled_sigmoid_stats": (
            lambda z: torch.stack(upsampled_sigmoid_stats(z, safe, valid, tile_elements=200)).square().sum(),
            (logits,),
        ),
        "prototype_similarity_stats": (
            lambda e: sum(t.square().sum() for t in prototype_similarity_stats(e, protos, labels, 4, budget=96)),
            (emb,),
        ),
        "prototype_contrast_sums": (
            lambda e: sum(prototype_contrast_sums(e, protos, proto_target, 0.5, budget=96)),
            (emb,),
        ),
        "unit_layer_norm": (lambda v, ww, bb: unit_layer_norm(v, ww, bb).square().sum(), (y, w, b)),
        "unit_layer_norm_channels_last": (
            lambda v, ww, bb: unit_layer_norm(v, ww, bb).square().sum(),
            (y.to(memory_format=torch.channels_last), w, b),
        ),
        "channel_norm": (lambda x: channel_norm(x).square().sum(), (y.flatten(2),)),
    }


@pytest.mark.parametrize("name", list(_functions()))
def test_custom_functions_under_inductor(name):
    fn, inputs = _functions()[name]
    eager_in = [t.clone().requires_grad_(True) for t in inputs]
    comp_in = [t.clone().requires_grad_(True) for t in inputs]
    eager = fn(*eager_in)
    eager.backward()
    compiled = torch.compile(fn, fullgraph=True)(*comp_in)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, **TOL)
    for a, b in zip(eager_in, comp_in, strict=False):
        torch.testing.assert_close(b.grad, a.grad, **TOL)
        assert b.grad.stride() == a.grad.stride()


@pytest.mark.parametrize("name", ["cac", "ssa"])
def test_image_context_slide_inference_compiles_the_first_image_once(name):
    """``slide_inference(context="image")`` on a compiled model: the head's context collection runs outside the
    graph (one graph break), and the tiles are dense copies, so the tiles of the first image compile at most 3
    graphs and the tiles of later images (of any size) none; the result is eager's. Counted by dynamo's own
    ``CompileCounter`` (its eager backend: the graphs, not inductor's code, are what recompiled)."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = replace_classifier(TinyFCN(aux=False), name).eval()
    unique_graphs = counters["stats"]["unique_graphs"]  # over the session: dynamo.reset() keeps it
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    first = torch.randn(1, 3, 64, 64)  # 9 tiles of 32 at stride 16
    expected = slide_inference(model, first, 32, 16, context="image")
    torch.testing.assert_close(slide_inference(compiled, first, 32, 16, context="image"), expected, **TOL)
    graphs = counter.frame_count
    assert 1 <= graphs <= 3, graphs
    for later in (torch.randn(1, 3, 64, 64), torch.randn(1, 3, 48, 80)):
        expected = slide_inference(model, later, 32, 16, context="image")
        torch.testing.assert_close(slide_inference(compiled, later, 32, 16, context="image"), expected, **TOL)
    assert counter.frame_count == graphs and counters["stats"]["unique_graphs"] - unique_graphs == graphs
