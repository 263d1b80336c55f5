"""Mixed precision saves memory: under bf16/fp16 the heads keep no float32 copy of the feature map for backward.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` over a training step (head + its loss) behind a conv
stem: the bytes of every feature-map-sized tensor autograd keeps, each storage once. Three modes: a float32 model,
a bf16 model (``model.bfloat16()``), a float32 model under bf16 autocast (the conv stem then hands the head bf16
features); fp16 on CUDA where present. Also the two half-feature matmuls against float32 references.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from adaptive_heads.functional import _half
from adaptive_heads.functional._half import class_sums, classify_pixels

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [1 << 22, 64])  # one chunk, and several (the floor: 256 pixels a chunk)
def test_half_feature_matmuls_equal_float32_references(monkeypatch, dtype, chunk):
    monkeypatch.setattr(_half, "_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 700).to(dtype).requires_grad_()
    reference = x.detach().float().requires_grad_()
    for small, product in (
        (torch.rand(2, 5, 700), lambda w, f: class_sums(w, f)),  # [B, n, N] weights -> [B, n, C]
        (torch.randn(5, 16), lambda a, f: classify_pixels(a, f)),  # a shared [n, C] classifier -> [B, n, N]
        (torch.randn(2, 5, 16), lambda a, f: classify_pixels(a, f)),  # one classifier per image
    ):
        small_half, small_ref = small.clone().requires_grad_(), small.clone().requires_grad_()
        out = product(small_half, x)
        expected = product(small_ref, reference)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        assert x.grad is not None and x.grad.dtype == dtype
        torch.testing.assert_close(small_half.grad, small_ref.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(x.grad.float(), reference.grad.to(dtype).float(), rtol=0, atol=0)
        x.grad, reference.grad = None, None


def test_fp16_class_sums_do_not_overflow():
    x = torch.full((1, 4, 70_000), 200.0, dtype=torch.float16)  # Σ over the pixels: 1.4e7 > fp16's 65504
    sums = class_sums(torch.ones(1, 2, 70_000), x)
    torch.testing.assert_close(sums, torch.full((1, 2, 4), 1.4e7))


def test_protoseg_chunked_inference_equals_the_per_prototype_loop():
    torch.manual_seed(0)
    head = make_head("proto", 16, 5, num_prototypes=4).eval()
    feat = torch.randn(2, 16, 7, 9)
    with torch.no_grad():
        chunked = head(feat)
    looped = head(feat.requires_grad_())  # with autograd: one K-slice at a time (and the autograd embedding)
    torch.testing.assert_close(chunked, looped.detach(), rtol=1e-5, atol=1e-5)
