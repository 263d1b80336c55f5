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


# ----------------------------------------------------------------------------- class-wise k-means
def _kmeans_loop(emb, labels, start, iters):
    """One class at a time: Lloyd rounds of spherical k-means from ``start [n, K, D]``."""
    centroids = start.clone()
    for c in range(start.shape[0]):
        pixels = emb[labels == c]
        if len(pixels) == 0:
            continue
        for _ in range(iters):
            nearest = (pixels @ centroids[c].T).argmax(1)
            for k in range(start.shape[1]):
                members = pixels[nearest == k]
                if len(members):
                    centroids[c, k] = F.normalize(members.sum(0), dim=0)
    return centroids


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_classwise_kmeans_matches_a_loop_over_classes():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(500, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(-1, 5, (500,), generator=g)
    labels[labels == 3] = 2  # class 3 has no pixel
    init = F.normalize(torch.randn(5, 4, 8, dtype=torch.float64), dim=-1)
    start, counts = AF.classwise_kmeans(
        emb, labels, 5, 4, iters=0, init=init, generator=torch.Generator().manual_seed(1)
    )
    fitted, _ = AF.classwise_kmeans(emb, labels, 5, 4, iters=6, init=init, generator=torch.Generator().manual_seed(1))
    assert counts.tolist() == [int((labels == c).sum()) for c in range(5)]
    torch.testing.assert_close(start[3], init[3])  # no pixel: the given centroids
    torch.testing.assert_close(fitted[3], init[3])
    # the starts are distinct pixels of their own class
    for c in (0, 1, 2, 4):
        own = emb[labels == c]
        assert ((start[c] @ own.T) > 1 - 1e-12).any(1).all()
        assert torch.linalg.matrix_rank(start[c]) == 4
    torch.testing.assert_close(fitted, _kmeans_loop(emb, labels, start, 6))
    torch.testing.assert_close(fitted.norm(dim=-1), torch.ones(5, 4, dtype=torch.float64))


def test_classwise_kmeans_finds_separated_clusters_and_handles_small_classes():
    centres = F.normalize(torch.eye(4)[:3] + 0.0, dim=1)  # class 0: three tight clusters on the axes
    g = torch.Generator().manual_seed(2)
    emb = F.normalize(centres.repeat_interleave(50, 0) + 0.01 * torch.randn(150, 4, generator=g), dim=1)
    emb = torch.cat([emb, F.normalize(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), dim=1)])  # class 1: one pixel
    labels = torch.tensor([0] * 150 + [1])
    fitted, counts = AF.classwise_kmeans(emb, labels, 2, 3, iters=10, generator=torch.Generator().manual_seed(0))
    assert counts.tolist() == [150, 1]
    found = (fitted[0] @ centres.T).max(0).values  # every true centre has a centroid next to it
    assert (found > 0.999).all()
    torch.testing.assert_close(fitted[1], emb[-1].expand(3, 4))  # fewer pixels than K: the pixel, repeated


def test_classwise_kmeans_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"emb must be \[N, D\] and labels \[N\]"):
        AF.classwise_kmeans(torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 2, 2)


def test_contrast_from_stats_gradient():
    """PPC and PPD from the similarity statistics: the written-out sparse gradient against gradcheck, and the values
    against the formulas (ignored pixels, -1, contribute nothing)."""
    torch.manual_seed(0)
    own = torch.rand(6, 3, dtype=torch.float64, requires_grad=True)
    lse = (torch.rand(6, dtype=torch.float64) + 2).requires_grad_()
    proto_target = torch.tensor([0, 4, -1, 8, 2, -1])  # c·K + k with K = 3
    ppc, ppd = AF.prototype_contrast_from_stats(own, lse, proto_target)
    keep = proto_target >= 0
    picked = own[torch.arange(6), proto_target.clamp_min(0) % 3]
    torch.testing.assert_close(ppc, (lse - picked)[keep].sum())
    torch.testing.assert_close(ppd, ((1 - picked) ** 2)[keep].sum())
    assert torch.autograd.gradcheck(
        lambda o, s: torch.stack(AF.prototype_contrast_from_stats(o, s, proto_target)), (own, lse)
    )


def test_similarity_stats_keep_one_dtype_under_autocast_whatever_the_chunking():
    """The one pass and the chunks give the same values in the same dtypes (bf16 autocast: the products' dtype)."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(3 * 4, 8), dim=1)
    labels = torch.randint(0, 3, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = AF.prototype_similarity_stats(emb, protos, labels, 3)
        chunked = AF.prototype_similarity_stats(emb, protos, labels, 3, budget=5 * 12)
    assert [t.dtype for t in whole] == [t.dtype for t in chunked] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)
