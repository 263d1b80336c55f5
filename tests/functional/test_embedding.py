"""ProtoSeg's L2-LayerNorm-L2 embedding tail with its hand-written backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import functional as AF


def _composite_unit_layer_norm(y, weight, bias, normalize_input):
    x = y.permute(0, 2, 3, 1)
    if normalize_input:
        x = F.normalize(x, dim=-1)
    return F.normalize(F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5), dim=-1)


@pytest.mark.parametrize("normalize_input", [True, False])
def test_unit_layer_norm_matches_autograd_of_composed_ops(normalize_input):

    torch.manual_seed(0)
    y = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    y[0, :, 1, 2] = 0  # a zero pixel and one with norm < 1e-12: the clamped branch of F.normalize
    y[0, :, 2, 0] *= 1e-13
    y.requires_grad_(True)
    weight = (1 + 0.3 * torch.randn(6, dtype=torch.float64)).requires_grad_(True)
    bias = (0.1 * torch.randn(6, dtype=torch.float64)).requires_grad_(True)
    g = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    ours = AF.unit_layer_norm(y, weight, bias, normalize_input=normalize_input)
    ref = _composite_unit_layer_norm(y, weight, bias, normalize_input)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad((ours * g).sum(), (y, weight, bias))
    grads_ref = torch.autograd.grad((ref * g).sum(), (y, weight, bias))
    for a, b in zip(grads, grads_ref, strict=False):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the inference path is the composed ops
        torch.testing.assert_close(AF.unit_layer_norm(y, weight, bias, normalize_input=normalize_input), ref)
    assert torch.autograd.gradcheck(
        lambda a, w, b: AF.unit_layer_norm(a, w, b, normalize_input=normalize_input), (y[1:], weight, bias)
    )


def test_unit_layer_norm_half_input_and_frozen_affine():

    y = torch.randn(1, 8, 2, 5, dtype=torch.bfloat16, requires_grad=True)
    weight, bias = torch.ones(8), torch.zeros(8)
    out = AF.unit_layer_norm(y, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (1, 2, 5, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, 2, 5))
    out.sum().backward()
    assert y.grad.dtype == torch.bfloat16 and torch.isfinite(y.grad.float()).all()
