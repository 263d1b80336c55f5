"""Class-wise soft and hard pooling."""

from __future__ import annotations

import torch

from adaptive_heads import functional as AF


def test_soft_class_pool_is_weighted_mean():
    probs = torch.rand(2, 3, 4, 5)
    feat = torch.randn(2, 6, 4, 5)
    out = AF.soft_class_pool(probs, feat)
    for b in range(2):
        for k in range(3):
            wts = probs[b, k].flatten()
            expected = (feat[b].flatten(1) * wts).sum(-1) / (wts.sum() + 1e-12)
            torch.testing.assert_close(out[b, k], expected)


def test_soft_class_pool_gradient_is_autograds_through_the_division():
    """The written-out backward of the soft means (∂/∂P = G X − (G ⊙ out) 1) against autograd's chain, and a
    float64 gradcheck; under bf16 autocast the products run in bfloat16 and the gradients follow within its
    rounding."""
    torch.manual_seed(0)
    probs = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    feat = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, x: AF.soft_class_pool(p, x, eps=1e-3), (probs, feat))
    grad = torch.randn(2, 3, 6, dtype=torch.float64)
    want = (probs.flatten(2) @ feat.flatten(2).transpose(1, 2)) / (probs.flatten(2).sum(-1, keepdim=True) + 1e-12)
    expected = torch.autograd.grad(want, (probs, feat), grad)
    got = torch.autograd.grad(AF.soft_class_pool(probs, feat), (probs, feat), grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    p32, x32 = (t.detach().float().requires_grad_() for t in (probs, feat))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AF.soft_class_pool(p32, x32)
    half = torch.autograd.grad(out, (p32, x32), grad.float())
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in half)
    for a, b in zip(half, expected, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0.05, atol=0.05)


def test_hard_class_pool_per_image_and_batch():
    feat = torch.randn(2, 4, 3, 3)
    labels = torch.tensor([[[0, 0, 1], [1, 255, 2], [2, 2, 2]], [[1, 1, 1], [1, 1, 1], [255, 255, 0]]])
    sums, counts = AF.hard_class_pool(feat, labels, 4, ignore_index=255, per_image=True)
    assert sums.shape == (2, 4, 4) and counts.shape == (2, 4)
    for b in range(2):
        for k in range(4):
            m = labels[b] == k
            assert counts[b, k] == m.sum()
            torch.testing.assert_close(sums[b, k], feat[b][:, m].sum(-1))
    bsums, bcounts = AF.hard_class_pool(feat, labels, 4, ignore_index=255, per_image=False)
    torch.testing.assert_close(bsums, sums.sum(0))
    assert bcounts.tolist() == [3.0, 8.0, 4.0, 0.0]


def test_label_one_hot_ignore_inside_class_range():
    labels = torch.tensor([[0, 1, 2, 1]])
    oh = AF.label_one_hot(labels, 3, ignore_index=1, dtype=torch.float32)
    assert oh[0].t().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]


def test_class_pixel_counts():
    labels = torch.tensor([[[0, 1], [1, 3]], [[2, 2], [2, 0]]])
    valid = labels != 3
    assert AF.class_pixel_counts(labels, 3, valid).tolist() == [[1, 2, 0], [1, 0, 3]]


def test_pooling_float32_under_autocast():
    feat = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    probs = torch.rand(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AF.soft_class_pool(probs, feat)
        logits = AF.cosine_logits(feat, torch.randn(3, 4), 15.0)
    assert out.dtype == torch.float32 and logits.dtype == torch.float32
