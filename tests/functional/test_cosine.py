"""Cosine logits, the channel norm and the 1×1 conv as a matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import functional as AF


@pytest.mark.parametrize("per_image", [False, True])
def test_cosine_logits_formula(per_image):
    feat = torch.randn(2, 5, 3, 4)
    weight = torch.randn(2, 6, 5) if per_image else torch.randn(6, 5)
    out = AF.cosine_logits(feat, weight, 15.0)
    x = feat / (feat.norm(dim=1, keepdim=True) + 1e-12)
    w = weight / (weight.norm(dim=-1, keepdim=True) + 1e-12)
    expected = torch.einsum("bnc,bchw->bnhw" if per_image else "nc,bchw->bnhw", w, x) * 15
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 15 + 1e-5


def test_cosine_logits_zero_pixel_gives_zero_not_nan():
    feat = torch.zeros(1, 4, 2, 2)
    out = AF.cosine_logits(feat, torch.randn(3, 4), 15.0)
    assert torch.equal(out, torch.zeros_like(out))


def test_pointwise_conv_equals_conv_including_channels_last():
    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(AF.pointwise_conv(x, conv.weight, conv.bias), conv(x))
    torch.testing.assert_close(
        AF.pointwise_conv(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias), conv(x)
    )
    no_bias = torch.nn.Conv2d(6, 4, 1, bias=False)
    torch.testing.assert_close(AF.pointwise_conv(x, no_bias.weight), no_bias(x))


def test_channel_norm_value_gradient_and_zero_vectors():
    x = torch.randn(2, 5, 3000, dtype=torch.float64)
    x[0, :, 7] = 0
    torch.testing.assert_close(AF.channel_norm(x), torch.linalg.vector_norm(x, dim=1, keepdim=True))
    small = x[:, :, :9].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: AF.channel_norm(z[:, :, 1:]), (small,))
    (grad,) = torch.autograd.grad(AF.channel_norm(small).sum(), small)
    assert torch.equal(grad[0, :, 7], torch.zeros(5, dtype=torch.float64))


def test_pointwise_conv_channel_dropout_equals_dropout2d_with_same_seed():
    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    torch.manual_seed(1)
    ours = AF.pointwise_conv(x, conv.weight, conv.bias, 0.3)
    torch.manual_seed(1)
    ref = conv(F.dropout2d(x, 0.3))
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    torch.manual_seed(1)
    strided = AF.pointwise_conv(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias, 0.3)
    torch.testing.assert_close(strided, ref)


def test_pointwise_conv_takes_one_matmul_path_for_every_layout():
    """No convolution kernel for channels-last or strided inputs (TF32 settings and rounding then cannot depend on
    the memory format)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(2, 6, 5, 7)
    for variant in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, ::2]):
        ops = Ops()
        with ops:
            out = AF.pointwise_conv(variant, conv.weight, conv.bias)
        assert "convolution" not in ops.names and {"bmm", "baddbmm"} & set(ops.names)
        torch.testing.assert_close(out, conv(variant), rtol=1e-5, atol=1e-6)
