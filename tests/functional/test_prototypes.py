"""Chunked pixel–prototype similarity statistics against dense autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptive_heads import functional as AF


@pytest.mark.parametrize("budget", [None, 7])
def test_chunked_similarity_ops_match_dense_autograd(budget):

    torch.manual_seed(0)
    emb = F.normalize(torch.randn(37, 5, dtype=torch.float64), dim=-1).requires_grad_(True)
    protos = F.normalize(torch.randn(4 * 3, 5, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (37,))
    target = labels * 3 + torch.randint(0, 3, (37,))
    target[::5] = -1
    dense = emb @ protos.t()
    best_ref = dense.view(37, 4, 3).amax(-1)
    own_ref = dense.view(37, 4, 3)[torch.arange(37), labels]
    keep = target >= 0
    ppc_ref = F.cross_entropy(dense[keep] / 0.5, target[keep], reduction="sum")
    ppd_ref = ((1 - dense[keep].gather(1, target[keep][:, None])) ** 2).sum()
    best, own, lse = AF.prototype_similarity_stats(emb, protos, labels, 4, budget=budget)
    ppc, ppd = AF.prototype_contrast_sums(emb, protos, target, 0.5, budget=budget)
    torch.testing.assert_close(best, best_ref)
    torch.testing.assert_close(own, own_ref)
    torch.testing.assert_close(lse, torch.logsumexp(dense, dim=1))
    torch.testing.assert_close(ppc, ppc_ref)
    torch.testing.assert_close(ppd, ppd_ref)
    w, v, u = torch.randn(37, 4, dtype=torch.float64), torch.randn(37, 3, dtype=torch.float64), torch.randn(37)
    stats_ref = (best_ref * w).sum() + (own_ref * v).sum() + (torch.logsumexp(dense, dim=1) * u).sum()
    for ours, ref_value in (
        ((best * w).sum(), (best_ref * w).sum()),  # only the max: no recomputation
        ((best * w).sum() + (own * v).sum() + (lse * u).sum(), stats_ref),
        (ppc + 3 * ppd, ppc_ref + 3 * ppd_ref),
    ):
        g_ref = torch.autograd.grad(ref_value, emb, retain_graph=True)[0]
        torch.testing.assert_close(torch.autograd.grad(ours, emb, retain_graph=True)[0], g_ref)
    assert torch.autograd.gradcheck(lambda e: AF.prototype_contrast_sums(e, protos, target, 0.5, budget)[0], (emb,))
    assert torch.autograd.gradcheck(lambda e: AF.prototype_similarity_stats(e, protos, labels, 4, budget), (emb,))


def test_similarity_pass_keeps_no_int64_pixel_by_class_tensor():
    """The class-wise argmax is kept for backward as uint8, written chunk by chunk: no int64 ``[N, n]``
    temporary (469 MiB at 2560 px, n = 150)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargeInt64(TorchDispatchMode):
        def __init__(self, limit: int) -> None:
            super().__init__()
            self.limit, self.seen = limit, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.numel() >= self.limit:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    n_pixels, n, k = 4096, 20, 3
    emb = torch.nn.functional.normalize(torch.randn(n_pixels, 8), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(n * k, 8), dim=1)
    labels = torch.randint(0, n, (n_pixels,))
    mode = LargeInt64(limit=n_pixels * n)
    with mode:
        AF.prototype_similarity_stats(emb, protos, labels, n, budget=n * k * 256)  # 16 chunks
    assert not mode.seen, mode.seen
