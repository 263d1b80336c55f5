"""Class-balanced reductions against loops."""

from __future__ import annotations

import torch

from adaptive_heads import functional as AF


def _loop_classwise(values, weights, labels, n, ignore):
    classes = [k for k in range(n) if (labels == k).any()]
    total = 0.0
    for k in classes:
        m = (labels == k).double()
        total += (m * weights * values).sum() / ((m * weights).sum() + 1e-12)
    return total / (len(classes) + 1e-12)


def test_classwise_weighted_mean_matches_loop():
    torch.manual_seed(0)
    values = torch.rand(3, 7, 5, dtype=torch.float64)
    weights = torch.rand(3, 7, 5, dtype=torch.float64)
    labels = torch.randint(0, 6, (3, 7, 5))
    labels[labels == 5] = 255
    labels[labels == 2] = 3  # class 2 absent
    out = AF.classwise_weighted_mean(values, weights, labels, 5, ignore_index=255)
    torch.testing.assert_close(out, torch.as_tensor(_loop_classwise(values, weights, labels, 5, 255)))
    all_avg = AF.classwise_weighted_mean(values, weights, labels, 5, ignore_index=255, average="all")
    present = [k for k in range(5) if (labels == k).any()]
    torch.testing.assert_close(all_avg, out * len(present) / 5)


def test_classwise_weighted_mean_empty_is_zero_with_grad():
    values = torch.rand(4, requires_grad=True)
    out = AF.classwise_weighted_mean(values, torch.ones(4), torch.full((4,), 255), 3, ignore_index=255)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(values.grad).all()
