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


@pytest.fixture
def convolution_path(monkeypatch):
    """The per-pixel products as convolutions (the path every device but the CPU takes), here on the CPU."""
    import adaptive_heads.functional.cosine as cosine

    monkeypatch.setattr(cosine, "_convolution_device", lambda x: True)


@pytest.mark.parametrize("layout", ["shared", "per_image", "stacked"])
def test_convolution_path_equals_the_matmul_path_value_and_gradients(layout, monkeypatch):
    """The grouped-convolution products (CUDA) against the batched matmuls (CPU): the same cosine logits and the
    same written-out gradients, for one shared classifier, one per image and a [K, B, n, C] stack of two."""
    import adaptive_heads.functional.cosine as cosine

    torch.manual_seed(0)
    feat = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    shapes = {"shared": [(6, 5)], "per_image": [(2, 6, 5), (2, 3, 5)], "stacked": [(2, 2, 6, 5)]}[layout]
    weights = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    arg = weights[0] if layout == "stacked" else weights

    def run():
        outs = cosine.cosine_logits_of(feat, arg, 15.0)
        grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o) for i, o in enumerate(outs)]
        return outs, torch.autograd.grad(outs, [feat, *weights], grads)

    matmul = run()
    monkeypatch.setattr(cosine, "_convolution_device", lambda x: True)
    conv = run()
    for a, b in zip([*matmul[0], *matmul[1]], [*conv[0], *conv[1]], strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, *w: cosine.cosine_logits_of(x, w[0] if layout == "stacked" else w,
                                                                          15.0), (feat, *weights))  # fmt: skip


@pytest.mark.parametrize("path", ["matmul", "convolution"])
def test_pointwise_conv_channel_dropout_equals_dropout2d_with_same_seed(path, request):
    """Values and every gradient, on the CPU's matmul path and on the convolution path of the other devices."""
    if path == "convolution":
        request.getfixturevalue("convolution_path")
    conv = torch.nn.Conv2d(6, 4, 1)
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    torch.manual_seed(1)
    ours = AF.pointwise_conv(x, conv.weight, conv.bias, 0.3)
    torch.manual_seed(1)
    ref = conv(F.dropout2d(x, 0.3))
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ours)
    params = [x, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b)


def test_float16_cosine_logits_stay_finite_and_match_float32():
    """float16 features whose products would leave float16's range (|ŵ·x| up to scale·|x|): the scale goes with
    the feature side, the logits and gradients stay finite and agree with float32."""
    torch.manual_seed(0)
    feat = (torch.randn(2, 64, 4, 4) * 3000).half().requires_grad_()
    weight = torch.randn(2, 5, 64).half().requires_grad_()
    out = AF.cosine_logits(feat, weight, 15.0)
    ref_feat, ref_weight = feat.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = AF.cosine_logits(ref_feat, ref_weight, 15.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.01)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (feat, weight), g)
    want = torch.autograd.grad(ref, (ref_feat, ref_weight), g)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float16 and torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, atol=1e-3 + 0.02 * b.abs().max().item(), rtol=0.02)


def test_pixel_products_as_a_convolution_equal_the_matmul(monkeypatch):
    """ProtoSeg's pixel–prototype similarities as the 1×1 convolution they run as off the CPU (the conv's TF32
    policy): the same values and gradients as the matmul, in a training step of the head."""
    import adaptive_heads.functional.cosine as cosine
    from adaptive_heads import PrototypeClassifier, PrototypeLoss

    rows, weight = torch.randn(37, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    monkeypatch.setattr(cosine, "_convolution_device", lambda x: True)
    torch.testing.assert_close(cosine.pixel_products(rows, weight), rows @ weight.t())
    results = []
    for as_convolution in (False, True):
        monkeypatch.setattr(cosine, "_convolution_device", lambda x, c=as_convolution: c)
        torch.manual_seed(0)
        head = PrototypeClassifier(16, 4, num_prototypes=3, update_assignment="argmax")
        feat = torch.randn(2, 16, 6, 5, requires_grad=True)
        target = torch.randint(0, 4, (2, 12, 10))
        loss = PrototypeLoss()(head(feat, target), target)["loss"]
        results.append((loss, torch.autograd.grad(loss, feat)[0], head.prototypes.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
