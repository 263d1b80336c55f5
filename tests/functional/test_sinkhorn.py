"""Class-wise Sinkhorn against a per-class loop (the official algorithm)."""

from __future__ import annotations

import torch

from adaptive_heads import functional as AF

from .. import reference_protoseg


# ----------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_matches_per_class_loop_and_equipartition():
    torch.manual_seed(0)
    scores = torch.rand(300, 5, dtype=torch.float64) * 2 - 1
    labels = torch.randint(-1, 6, (300,))
    plan = AF.classwise_sinkhorn(scores, labels, 6)
    assert torch.equal(plan[labels < 0], torch.zeros_like(plan[labels < 0]))
    for c in range(6):
        sel = labels == c
        expected = reference_protoseg.sinkhorn(scores[sel])
        torch.testing.assert_close(plan[sel], expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(plan[sel].sum(1), torch.ones(int(sel.sum()), dtype=torch.float64))
    # with enough iterations each prototype receives N_c / K of the mass
    long_plan = AF.classwise_sinkhorn(scores, labels, 6, iters=200, eps=0.5)
    for c in range(6):
        sel = labels == c
        torch.testing.assert_close(long_plan[sel].sum(0), torch.full((5,), sel.sum() / 5.0, dtype=torch.float64))


def test_sinkhorn_tiny_eps_is_finite_and_float32_under_autocast():
    torch.manual_seed(0)
    scores = (torch.rand(500, 10) * 2 - 1).bfloat16()
    labels = torch.randint(0, 3, (500,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = AF.classwise_sinkhorn(scores, labels, 3, eps=1e-3)
    assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(1), torch.ones(500))
