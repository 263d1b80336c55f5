"""Pixel–prototype similarities without keeping the ``[N, n·K]`` cosines for backward.

At 2560 px (stride 4) ProtoSeg's ``[N, n·K]`` cosines are 2.3 GiB per copy, and autograd keeps several
(the similarities, the max over K, the PPC log-softmax and its gradient). Here one pass over the similarities
yields everything the head and its losses need: the class-wise max (segmentation logits), the cosines to the
pixel's own class's prototypes (Sinkhorn input, PPC/PPD targets) and the log-sum-exp over all prototypes (the PPC
normaliser). Backward recomputes the similarities only when the log-sum-exp received a gradient, and applies every
gradient in one matmul. The pass runs on all pixels at once where the ``[N, n·K]`` block fits the device's memory
budget (:func:`~adaptive_heads.memory_budget`), in pixel chunks of that size otherwise. Matmuls per training step:
one forward and at most two backward (the official code does two forward and four backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._budget import memory_budget
from .._precision import compute_dtype, upcast_half
from .cosine import pixel_products

__all__ = [
    "classwise_kmeans",
    "prototype_best_similarity",
    "prototype_contrast_from_stats",
    "prototype_contrast_sums",
    "prototype_similarity_stats",
]


def _chunks(emb: Tensor, width: int, budget: int | None) -> list[slice]:
    """Pixel slices of ``[chunk, width]`` blocks: ``budget`` elements each, default the device's memory budget."""
    n_pixels = emb.shape[0]
    # a pass holds about 2.5 float32 blocks (the similarities, their float32 copy under autocast, log-sum-exp's
    # temporary), and one block stays below 2³¹ elements (a larger convolution falls back to slow kernels)
    elements = min(memory_budget(emb.device) * 2 // (5 * 4), 2**31 - 1) if budget is None else budget
    step = max(1, elements // max(1, width))
    return [slice(s, min(s + step, n_pixels)) for s in range(0, n_pixels, step)]


class _PrototypeSimilarityStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, protos, labels, num_classes, budget):
        ctx.set_materialize_grads(False)
        n_pixels, k = emb.shape[0], protos.shape[0] // num_classes
        chunks = _chunks(emb, protos.shape[0], budget)
        index = labels.view(-1, 1, 1).expand(-1, 1, k)
        arg_dtype = torch.uint8 if k <= 256 else torch.long  # the argmax over K, kept for backward
        wide = torch.float64 if emb.dtype == torch.float64 else torch.float32
        if len(chunks) == 1:
            sims = pixel_products(emb, protos)  # the autocast dtype under autocast
            best, arg = sims.view(n_pixels, num_classes, k).max(dim=-1)
            own = sims.view(n_pixels, num_classes, k).gather(1, index).squeeze(1)
            lse = torch.logsumexp(sims.to(wide), dim=1)
            arg = arg.to(arg_dtype)
        else:
            sim_dtype = emb.dtype if emb.dtype == torch.float64 else compute_dtype(emb)  # as the one pass's
            best = emb.new_empty(n_pixels, num_classes, dtype=sim_dtype)
            arg = torch.empty(n_pixels, num_classes, dtype=arg_dtype, device=emb.device)
            own = emb.new_empty(n_pixels, k, dtype=sim_dtype)
            lse = emb.new_empty(n_pixels, dtype=wide)
            for sl in chunks:
                sims = pixel_products(emb[sl], protos)
                grouped = sims.view(-1, num_classes, k)
                best[sl], chunk_arg = grouped.max(dim=-1)
                arg[sl] = chunk_arg
                own[sl] = grouped.gather(1, index[sl]).squeeze(1)
                lse[sl] = torch.logsumexp(sims.to(wide), dim=1)
        ctx.save_for_backward(emb, protos, labels, arg, lse)
        ctx.num_classes, ctx.k, ctx.budget, ctx.sim_dtype = num_classes, k, budget, sims.dtype
        return best, own, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_best, grad_own, grad_lse):
        if grad_best is None and grad_own is None and grad_lse is None:
            return None, None, None, None, None
        emb, protos, labels, arg, lse = ctx.saved_tensors
        n, k = ctx.num_classes, ctx.k
        chunks = _chunks(emb, protos.shape[0], ctx.budget)
        grad = torch.empty_like(emb) if len(chunks) > 1 else None
        for sl in chunks:
            rows = sl.stop - sl.start
            if grad_lse is not None:  # softmax over all prototypes, recomputed as the forward computed it
                sims = pixel_products(emb[sl].to(ctx.sim_dtype), protos.to(ctx.sim_dtype))
                g = sims.to(lse.dtype).sub_(lse[sl, None]).exp_().mul_(grad_lse[sl, None])
            else:
                g = lse.new_zeros(rows, n * k)
            g = g.view(rows, n, k)
            if grad_best is not None:
                g.scatter_add_(2, arg[sl].long().unsqueeze(-1), grad_best[sl].unsqueeze(-1).to(g.dtype))
            if grad_own is not None:
                g.scatter_add_(1, labels[sl].view(-1, 1, 1).expand(-1, 1, k), grad_own[sl].unsqueeze(1).to(g.dtype))
            block = pixel_products(g.view(rows, -1).to(ctx.sim_dtype), protos.to(ctx.sim_dtype).t())  # forward's dtype
            if grad is None:
                return block.to(emb.dtype), None, None, None, None
            grad[sl] = block
        return grad, None, None, None, None


def prototype_similarity_stats(
    emb: Tensor, protos: Tensor, labels: Tensor, num_classes: int, budget: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel statistics of the cosines ``s = emb @ protosᵀ`` without keeping ``s``.

    Args:
        emb: ``[N, D]`` unit pixel embeddings (with gradient).
        protos: ``[n·K, D]`` unit prototypes, row ``c·K + k`` (no gradient).
        labels: ``[N]`` class whose prototypes ``own`` reports (any valid class for ignored pixels).
        budget: elements of one ``[chunk, n·K]`` block (default: the device's memory budget).

    Returns:
        ``best [N, n]`` = ``max_k s_{i,ck}``, ``own [N, K]`` = ``s_{i,(labels_i)k}`` and ``lse [N]`` =
        ``log Σ_j exp(s_ij)`` (float32 or wider), all differentiable w.r.t. ``emb``.

    Example:
        >>> emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
        >>> protos = torch.nn.functional.normalize(torch.randn(3 * 2, 4), dim=1)  # n = 3 classes, K = 2
        >>> best, own, lse = prototype_similarity_stats(emb, protos, torch.tensor([0, 1, 2, 0, 1, 2]), 3)
        >>> best.shape, own.shape, lse.shape
        (torch.Size([6, 3]), torch.Size([6, 2]), torch.Size([6]))
    """
    return _PrototypeSimilarityStats.apply(emb, protos.detach().to(emb.dtype), labels, num_classes, budget)


def prototype_best_similarity(emb: Tensor, protos: Tensor, num_classes: int, budget: int | None = None) -> Tensor:
    """``best [N, n]`` = ``max_k emb @ protosᵀ`` per class, without keeping the ``[N, n·K]`` cosines (inference).

    One ``[chunk, n·K]`` matmul per pixel chunk, as training's :func:`prototype_similarity_stats`; no gradient.

    Args:
        emb: ``[N, D]`` unit pixel embeddings.
        protos: ``[n·K, D]`` unit prototypes, row ``c·K + k``.
        budget: elements of one ``[chunk, n·K]`` block (default: the device's memory budget).

    Example:
        >>> emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
        >>> protos = torch.nn.functional.normalize(torch.randn(3 * 2, 4), dim=1)  # n = 3 classes, K = 2
        >>> best = prototype_best_similarity(emb, protos, 3)
        >>> torch.equal(best, (emb @ protos.t()).view(6, 3, 2).amax(-1))
        True
    """
    n_pixels, k = emb.shape[0], protos.shape[0] // num_classes
    chunks = _chunks(emb, protos.shape[0], budget)
    with torch.no_grad():
        protos = protos.to(emb.dtype)
        if len(chunks) == 1:
            return pixel_products(emb, protos).view(n_pixels, num_classes, k).amax(dim=-1)
        best = emb.new_empty(n_pixels, num_classes)
        for sl in chunks:
            best[sl] = pixel_products(emb[sl], protos).view(-1, num_classes, k).amax(dim=-1)
    return best


class _PrototypeContrast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, protos, target, temperature, budget):
        valid = target >= 0
        safe = torch.where(valid, target, torch.zeros_like(target))
        ppc = emb.new_zeros(())
        ppd = emb.new_zeros(())
        for sl in _chunks(emb, protos.shape[0], budget):
            sims = pixel_products(emb[sl], protos)
            picked = sims.gather(1, safe[sl].unsqueeze(1)).squeeze(1)
            keep = valid[sl].to(sims.dtype)
            # out of place: torch 2.11's inductor zeroes the gradient of an output updated in place
            ppc = ppc + ((torch.logsumexp(sims / temperature, dim=1) - picked / temperature) * keep).sum()
            ppd = ppd + ((1 - picked).pow(2) * keep).sum()
        ctx.save_for_backward(emb, protos, safe, valid)
        ctx.temperature, ctx.budget = temperature, budget
        return ppc, ppd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ppc, grad_ppd):
        emb, protos, safe, valid = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(emb)
        for sl in _chunks(emb, protos.shape[0], ctx.budget):
            sims = pixel_products(emb[sl], protos)
            index = safe[sl].unsqueeze(1)
            picked = sims.gather(1, index)
            g = torch.softmax(sims / t, dim=1).mul_(grad_ppc / t)
            g.scatter_add_(1, index, -grad_ppc / t - 2 * grad_ppd * (1 - picked))
            g.mul_(valid[sl].unsqueeze(1).to(g.dtype))
            grad[sl] = pixel_products(g, protos.t())
        return grad, None, None, None, None


def prototype_contrast_sums(
    emb: Tensor, protos: Tensor, target: Tensor, temperature: float = 1.0, budget: int | None = None
) -> tuple[Tensor, Tensor]:
    """Sums over valid pixels of the PPC and PPD terms, computed in pixel chunks.

    ``PPC_i = logsumexp_j(s_ij / T) − s_{i,t_i} / T`` and ``PPD_i = (1 − s_{i,t_i})²`` with
    ``s = emb @ protosᵀ``; pixels with ``target < 0`` are skipped.

    Args:
        emb: ``[N, D]`` unit pixel embeddings (with gradient).
        protos: ``[n·K, D]`` unit prototypes (no gradient).
        target: ``[N]`` long prototype index ``c·K + k``, ``-1`` = ignored.

    Returns:
        ``(ppc_sum, ppd_sum)`` scalars.

    Example:
        >>> emb = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
        >>> protos = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
        >>> ppc, ppd = prototype_contrast_sums(emb, protos, torch.tensor([0, 1, 2, 3, -1]))
        >>> bool(ppc > 0), bool(ppd >= 0)
        (True, True)
    """
    return _PrototypeContrast.apply(emb, protos.detach().to(emb.dtype), target, temperature, budget)


class _ContrastFromStats(torch.autograd.Function):
    """PPC and PPD sums from the per-pixel statistics, their (sparse) gradients written out."""

    @staticmethod
    def forward(ctx, own: Tensor, lse: Tensor, proto_target: Tensor) -> tuple[Tensor, Tensor]:
        keep = (proto_target >= 0).to(lse.dtype)
        within = proto_target.clamp_min(0).remainder_(own.shape[1]).unsqueeze(1)
        picked = upcast_half(own).gather(1, within).squeeze(1)
        distance = 1 - picked
        ctx.save_for_backward(keep, within, distance)
        ctx.own_shape, ctx.own_dtype = own.shape, own.dtype
        return torch.dot(lse - picked, keep), torch.dot(distance.square(), keep)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ppc: Tensor, grad_ppd: Tensor):
        keep, within, distance = ctx.saved_tensors
        # ∂/∂lse_i = keep_i · g_ppc; ∂/∂s_{i,t_i} = −keep_i · (g_ppc + 2 g_ppd (1 − s_{i,t_i}))
        picked_grad = distance.mul(2 * grad_ppd).add_(grad_ppc).mul_(-keep)
        grad_own = keep.new_zeros(ctx.own_shape).scatter_(1, within, picked_grad.unsqueeze(1))
        return grad_own.to(ctx.own_dtype), keep * grad_ppc, None


def prototype_contrast_from_stats(own: Tensor, lse: Tensor, proto_target: Tensor) -> tuple[Tensor, Tensor]:
    """PPC and PPD sums at temperature 1 from the statistics of :func:`prototype_similarity_stats` (no new pass).

    Args:
        own: ``[N, K]`` cosines to the prototypes of each pixel's own class.
        lse: ``[N]`` log-sum-exp over all ``n·K`` prototype cosines.
        proto_target: ``[N]`` prototype index ``c·K + k`` (``-1`` = ignored).

    Returns:
        ``(ppc_sum, ppd_sum)``: ``Σ (lse_i − s_{i,t_i})`` and ``Σ (1 − s_{i,t_i})²`` over the valid pixels.

    Example:
        >>> own = torch.tensor([[0.9, 0.1]])  # the pixel's cosines to its class's K = 2 prototypes
        >>> lse = torch.tensor([1.5])
        >>> ppc, ppd = prototype_contrast_from_stats(own, lse, torch.tensor([0]))  # assigned to prototype 0
        >>> round(ppc.item(), 3), round(ppd.item(), 3)
        (0.6, 0.01)
    """
    return _ContrastFromStats.apply(own, lse, proto_target)


@torch.no_grad()
def classwise_kmeans(
    emb: Tensor,
    labels: Tensor,
    num_classes: int,
    num_prototypes: int,
    *,
    iters: int = 10,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Spherical k-means of every class's pixel embeddings, all classes at once: K unit centroids per class.

    Starts from K pixels of each class drawn by k-means++ (Arthur and Vassilvitskii, 2007: each next start with
    probability proportional to its squared distance to the nearest start so far; a class with fewer distinct
    pixels than K repeats them), then ``iters`` Lloyd rounds: each pixel joins the nearest (cosine) centroid of its own
    class, each centroid becomes the normalised sum of its pixels; a centroid left without pixels keeps its
    place. One ``[chunk, n·K]`` similarity block at a time (:func:`prototype_similarity_stats`), no loop over
    classes.

    Args:
        emb: ``[N, D]`` unit pixel embeddings.
        labels: ``[N]`` class of each pixel; values outside ``[0, n)`` (an ignore label) leave the pixel out.
        num_classes: n.
        num_prototypes: K.
        iters: Lloyd rounds (0 keeps the drawn pixels).
        init: ``[n, K, D]`` centroids returned for the classes without pixels (default: zeros).
        generator: for the draw of the starting pixels.

    Returns:
        ``centroids [n, K, D]`` (float32 or wider) and ``counts [n]``, the pixels of each class.

    Example:
        >>> emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.0], [0.0, 1.0]]), dim=1)
        >>> centroids, counts = classwise_kmeans(emb, torch.tensor([0, 0, 0, 1]), num_classes=2, num_prototypes=2)
        >>> counts.tolist(), centroids[1, 0].tolist()
        ([3, 1], [0.0, 1.0])
        >>> sorted(round(c[0].item(), 3) for c in centroids[0])  # the pair at +x and the pixel at -x
        [-1.0, 1.0]
    """
    if emb.dim() != 2 or labels.shape != emb.shape[:1]:
        raise ValueError(f"emb must be [N, D] and labels [N], got {tuple(emb.shape)} and {tuple(labels.shape)}")
    if num_classes < 1 or num_prototypes < 1 or iters < 0:
        raise ValueError(f"need num_classes, num_prototypes >= 1 and iters >= 0, got {num_classes}, "
                         f"{num_prototypes}, {iters}")  # fmt: skip
    n, k = num_classes, num_prototypes
    emb = upcast_half(emb)
    n_pixels, dim = emb.shape
    valid = (labels >= 0) & (labels < n)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    counts = torch.zeros(n + 1, dtype=torch.long, device=emb.device)
    counts = counts.index_add_(0, torch.where(valid, safe, n), torch.ones_like(safe))[:n]
    fallback = emb.new_zeros(n, k, dim) if init is None else init.to(emb)
    if n_pixels == 0:
        return fallback, counts
    # k-means++ starts, K rounds for all classes at once: each class draws one pixel with probability ∝ its squared
    # distance to the nearest start drawn so far (uniform in round 0), by the exponential-race trick: the pixel with
    # the smallest Exp(1)/weight of its class; pixels at distance 0 draw only when nothing else is left (a repeat)
    group = torch.where(valid, safe, n)  # the ignored pixels sort last
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    nearest = emb.new_full((n_pixels,), -1.0)  # max cosine to the starts of the pixel's class
    chosen = []
    for _ in range(k):
        # drawn where the generator lives (a CPU generator with CUDA embeddings), then moved
        place = emb.device if generator is None else generator.device
        race = torch.empty(n_pixels, dtype=emb.dtype, device=place).exponential_(generator=generator).to(emb.device)
        weight = (2.0 - 2.0 * nearest).clamp_min(0.0)
        key = torch.where(weight > 0, race / weight, torch.full_like(race, float("inf")))
        order = key.argsort()
        order = order[group[order].argsort(stable=True)]  # by class, the smallest key first
        pick = order[starts.clamp_max(n_pixels - 1)]  # [n]
        chosen.append(emb[pick])
        nearest = torch.maximum(nearest, (emb * emb[pick][safe]).sum(1))
    centroids = torch.where((counts > 0)[:, None, None], torch.stack(chosen, 1), fallback)
    for _ in range(iters):
        _, own, _ = prototype_similarity_stats(emb, centroids.reshape(n * k, dim), safe, n)
        slot = torch.where(valid, safe * k + own.argmax(dim=1), n * k)
        sums = emb.new_zeros(n * k + 1, dim).index_add_(0, slot, emb)[:-1]
        filled = emb.new_zeros(n * k + 1).index_add_(0, slot, torch.ones_like(emb[:, 0]))[:-1] > 0
        centroids = torch.where(filled[:, None], F.normalize(sums, dim=1), centroids.reshape(n * k, dim))
        centroids = centroids.view(n, k, dim)
    return centroids, counts
