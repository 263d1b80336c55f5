"""Mixed precision saves memory: under bf16/fp16 the heads keep no float32 copy of the feature map for backward.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` over a training step (head + its loss) behind a conv
stem: the bytes of every feature-map-sized tensor autograd keeps, each storage once. Three modes: a float32 model,
a bf16 model (``model.bfloat16()``), a float32 model under bf16 autocast (the conv stem then hands the head bf16
features); fp16 on CUDA where present. Also the pooling and cosine products of half features against float32.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import adaptive_heads as ah
from adaptive_heads.functional import class_sums, cosine_logits

from .conftest import make_head

MODES = ["float32", "bf16-model", "bf16-autocast"]


def saved_feature_bytes(name: str, mode: str, device: str = "cpu", half: torch.dtype = torch.bfloat16) -> float:
    """Feature-map-sized bytes saved for backward by one training step, in float32 feature maps."""
    torch.manual_seed(0)
    batch, channels, classes, size = 2, 32, 5, (16, 20)
    stem = nn.Conv2d(3, channels, 1)
    head = make_head(name, channels, classes)
    model = nn.Sequential(stem, head).to(device).train()
    if mode.endswith("model"):
        model = model.to(half)
    images = torch.randn(2, 3, *size, device=device, dtype=half if mode.endswith("model") else torch.float32)
    target = torch.randint(0, classes, (batch, 2 * size[0], 2 * size[1]), device=device)
    feature_numel = batch * channels * size[0] * size[1]
    kept: dict[tuple[int, torch.dtype], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= feature_numel:
            kept[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast(device, dtype=half) if mode.endswith("autocast") else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = head(stem(images), target)
        loss = head.default_loss()(out, target)["loss"]
    loss.backward()
    return sum(kept.values()) / (feature_numel * 4)


def test_half_precision_keeps_no_more_than_float32(head_name):
    float32 = saved_feature_bytes(head_name, "float32")
    for mode in MODES[1:]:
        half = saved_feature_bytes(head_name, mode)
        assert half <= float32, (mode, half, float32)
        # measured (docs/reliability.md): CAC 0.5 of float32 (one bf16 copy, what the coarse conv needs anyway),
        # SSA-Seg 0.5 (its three feature maps in bf16), ProtoSeg 0.75 (its LayerNorm embedding stays float32)
        assert half <= {"cac": 0.5, "ssa": 0.5, "proto": 0.75}[head_name] * float32, (mode, half, float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_keeps_no_more_than_float32(head_name):
    float32 = saved_feature_bytes(head_name, "float32", "cuda")
    for mode in MODES[1:]:
        assert saved_feature_bytes(head_name, mode, "cuda", torch.float16) <= float32


def test_bf16_pooling_runs_in_bf16_and_fp16_in_float32():
    """The pooling product of half features runs in bf16 (its range holds any sum; float32 accumulation inside
    the GEMM), and in float32 for float16, whose range a sum over many pixels exceeds. Gradients as float32's."""
    torch.manual_seed(0)
    weights = torch.rand(2, 5, 700)
    for dtype, tolerance in ((torch.bfloat16, 2e-2), (torch.float16, 1e-3)):
        x = torch.randn(2, 16, 700).to(dtype).requires_grad_()
        reference = x.detach().float().requires_grad_()
        out, expected = class_sums(weights, x), class_sums(weights, reference)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance * 10)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.float(), reference.grad, rtol=tolerance, atol=tolerance)


def test_fp16_class_sums_do_not_overflow():
    x = torch.full((1, 4, 70_000), 200.0, dtype=torch.float16)  # Σ over the pixels: 1.4e7 > fp16's 65504
    sums = class_sums(torch.ones(1, 2, 70_000), x)
    torch.testing.assert_close(sums, torch.full((1, 2, 4), 1.4e7))


def test_cosine_logits_of_half_features_within_half_precision():
    torch.manual_seed(0)
    feat, weight = torch.randn(2, 16, 5, 7), torch.randn(2, 4, 16)
    expected = cosine_logits(feat, weight, 15.0)
    for dtype in (torch.bfloat16, torch.float16):
        out = cosine_logits(feat.to(dtype), weight, 15.0)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=15 * 2**-7)  # the product in the half dtype


def test_protoseg_chunked_inference_equals_the_per_prototype_loop():
    torch.manual_seed(0)
    head = make_head("proto", 16, 5, num_prototypes=4).eval()
    feat = torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        chunked = head(feat)
    looped = head(feat.requires_grad_())  # with autograd: one K-slice at a time (and the autograd embedding)
    torch.testing.assert_close(chunked, looped.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cac", "ssa", "proto"])
def test_products_run_in_bfloat16_under_autocast(name):
    """Under bf16 autocast the heads' matrix products (forward, loss terms, backward) run with bf16 inputs, as the
    conv they replace; float32 is kept for the norms, softmax statistics and sums, not for the products: at most
    10 % of the product work stays float32 (SSA-Seg's [B, n, n] relation matrices). One pass (a GPU's budget)."""
    from benchmarks.measure import gemm_flops_by_dtype

    ah.set_memory_budget(1 << 30, "cpu")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(ah.HEADS[name](64, 19)).train()
        feat = torch.randn(2, 64, 16, 16, requires_grad=True)
        target = torch.randint(0, 19, (2, 128, 128))

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16), ah.supervise(model, target) as sup:
                model(feat)
                loss = sup.loss(include_main=True)
            loss.backward()

        flops = gemm_flops_by_dtype(step)
    finally:
        ah.set_memory_budget(None, "cpu")
    assert flops.get("float32", 0) <= 0.1 * sum(flops.values()), flops
