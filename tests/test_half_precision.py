"""Half-precision models: ``model.half()`` / ``model.bfloat16()`` with any head, in eval and in training.

The pooling sums, norms, softmax statistics, Sinkhorn and LayerNorm statistics run in float32 inside; the logits
come out in the model's dtype. On CPU the tests use bfloat16 (CPU float16 convolutions are slow and partly
missing); with CUDA, float16 as well.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import adaptive_heads as ah

from .conftest import make_head
from .models import TinyFCN

# documented: largest |logit difference| of a half model against the same model in float32 (tau = 15 for
# CAC/SSA; ProtoSeg's mask_norm logits are O(1)), on unit-scale features
HALF_MODEL_TOL = {torch.bfloat16: 0.25, torch.float16: 0.05}  # measured here: 0.07 (bf16, 5 seeds)

DEVICES_AND_DTYPES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    DEVICES_AND_DTYPES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TinyFCN(num_classes=5, width=16, aux=False)
    return ah.replace_classifier(model, lambda c, n: make_head(name, c, n))


@pytest.mark.parametrize(("device", "dtype"), DEVICES_AND_DTYPES)
def test_half_model_eval_matches_float32_within_tolerance(head_name, device, dtype):
    model = build(head_name).to(device).eval()
    half = copy.deepcopy(model).to(dtype)
    images = torch.rand(2, 3, 32, 40, device=device)
    with torch.no_grad():
        reference = model(images)["out"]
        low = half(images.to(dtype))["out"]
        head_logits = half.classifier[4](half.classifier[:4](half.backbone(images.to(dtype))))
    assert low.dtype == dtype and head_logits.dtype == dtype
    assert torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() <= HALF_MODEL_TOL[dtype]


@pytest.mark.parametrize(("device", "dtype"), DEVICES_AND_DTYPES)
def test_half_model_trains(head_name, device, dtype):
    model = build(head_name).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images = torch.rand(2, 3, 32, 40, device=device, dtype=dtype)
    target = torch.randint(0, 5, (2, 32, 40), device=device)
    target[0, :4] = 255
    for _ in range(2):
        with ah.supervise(model, target) as sup:
            logits = model(images)["out"]
            terms = sup.losses()
            loss = F.cross_entropy(logits.float(), target, ignore_index=255) + terms["adaptive_loss"]
        assert logits.dtype == dtype
        assert all(torch.isfinite(v) for v in terms.values()), terms
        optimizer.zero_grad()
        loss.backward()
        for pname, p in model.named_parameters():
            assert p.grad is None or (p.grad.dtype == dtype and torch.isfinite(p.grad).all()), pname
        optimizer.step()


def test_protoseg_buffers_stay_float32_and_keep_moving():
    """A momentum step moves a prototype by 0.1 %, below bfloat16's resolution: the buffers stay float32."""
    torch.manual_seed(0)
    head = ah.PrototypeClassifier(8, 3, num_prototypes=2, update_assignment="argmax", gamma=0.999).bfloat16()
    assert head.prototypes.dtype == torch.float32 and head.usage_counts.dtype == torch.float32
    assert head.proj_head.proj[0].weight.dtype == torch.bfloat16
    before = head.prototypes.clone()
    feat = torch.randn(2, 8, 6, 6, dtype=torch.bfloat16)
    target = torch.randint(0, 3, (2, 6, 6))
    head.train()
    for _ in range(3):
        head(feat, target)
    assert (head.prototypes - before).abs().max() > 1e-5  # bfloat16 storage would round every step away
    head.double()  # wider casts apply as usual
    assert head.prototypes.dtype == torch.float64
    state = head.bfloat16().state_dict()
    assert state["prototypes"].dtype == torch.float32
