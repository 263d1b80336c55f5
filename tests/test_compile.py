"""torch.compile: every head compiles without graph breaks in eval and in training."""

import pytest
import torch

from adaptive_heads import (
    ContextAwareClassifier,
    ContextAwareLoss,
    PrototypeClassifier,
    PrototypeLoss,
    SSAClassifier,
    SSALoss,
)

HEADS = {
    "cac": (ContextAwareClassifier, ContextAwareLoss),
    "ssa": (SSAClassifier, SSALoss),
    "proto": (PrototypeClassifier, PrototypeLoss),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", HEADS)
def test_compile_fullgraph_eval_and_training(name):
    head_cls, loss_cls = HEADS[name]
    torch.manual_seed(0)
    kwargs = {"update_prototypes": False} if name == "proto" else {"dropout": 0.0}
    head = head_cls(8, 5, **kwargs)
    feat = torch.randn(2, 8, 6, 7)
    target = torch.randint(0, 5, (2, 24, 28))
    head.eval()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(feat), head(feat))

    head.train()
    loss_fn = loss_cls()

    def step(f, t):
        return loss_fn(head(f, t), t)["loss"]

    f1 = feat.clone().requires_grad_(True)
    f2 = feat.clone().requires_grad_(True)
    eager = step(f1, target)
    eager.backward()
    value = torch.compile(step, fullgraph=True, backend="aot_eager")(f2, target)
    value.backward()
    torch.testing.assert_close(value, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f2.grad, f1.grad, rtol=1e-4, atol=1e-5)
