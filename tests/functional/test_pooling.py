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
