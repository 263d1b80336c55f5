"""Pixel–prototype similarities in pixel chunks, so no ``[N, n·K]`` tensor is kept for backward.

At 2560 px (stride 4) ProtoSeg's ``[N, n·K]`` cosines are 2.3 GiB per copy, and autograd keeps several
(the similarities, the max over K, the PPC log-softmax and its gradient). Here both the class-wise max and the
PPC/PPD losses run over chunks of pixels, and backward recomputes each chunk's similarities (one matmul) and
applies the exact gradient. Peak extra memory: one ``[chunk, n·K]`` block.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_max_similarity", "prototype_contrast_sums"]

#: elements of one ``[chunk, n·K]`` similarity block (~64 MB in float32)
CHUNK_ELEMENTS = 1 << 24


def _chunks(n_pixels: int, width: int, budget: int | None):
    step = max(1, (CHUNK_ELEMENTS if budget is None else budget) // max(1, width))
    return [slice(s, min(s + step, n_pixels)) for s in range(0, n_pixels, step)]


class _ClassMaxSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, protos, labels, num_classes, budget):
        n_pixels, k = emb.shape[0], protos.shape[0] // num_classes
        best = emb.new_empty(n_pixels, num_classes)
        arg = torch.empty(n_pixels, num_classes, dtype=torch.long, device=emb.device)
        own = emb.new_empty(n_pixels, k)
        for sl in _chunks(n_pixels, protos.shape[0], budget):
            sims = (emb[sl] @ protos.t()).view(-1, num_classes, k)
            best[sl], arg[sl] = sims.max(dim=-1)
            own[sl] = sims.gather(1, labels[sl].view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
        ctx.save_for_backward(protos, arg.to(torch.uint8) if k <= 256 else arg)  # 1 byte per (pixel, class)
        ctx.num_classes, ctx.k, ctx.budget = num_classes, k, budget
        ctx.mark_non_differentiable(own)
        return best, own

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_best, _grad_own):
        protos, arg = ctx.saved_tensors
        n_pixels = arg.shape[0]
        grad = grad_best.new_empty(n_pixels, protos.shape[1])
        for sl in _chunks(n_pixels, protos.shape[0], ctx.budget):
            g = grad_best.new_zeros(sl.stop - sl.start, ctx.num_classes, ctx.k)
            g.scatter_(2, arg[sl].long().unsqueeze(-1), grad_best[sl].unsqueeze(-1))
            grad[sl] = g.view(g.shape[0], -1) @ protos.to(g.dtype)
        return grad, None, None, None, None


def class_max_similarity(
    emb: Tensor, protos: Tensor, labels: Tensor, num_classes: int, budget: int | None = None
) -> tuple[Tensor, Tensor]:
    """Best cosine per class and the cosines to the pixel's own class's prototypes.

    Args:
        emb: ``[N, D]`` unit pixel embeddings (with gradient).
        protos: ``[n·K, D]`` unit prototypes, row ``c·K + k`` (no gradient).
        labels: ``[N]`` class whose prototypes ``own`` reports (any valid class for ignored pixels).

    Returns:
        ``best [N, n]`` = ``max_k <e, p_ck>`` (differentiable w.r.t. ``emb``) and ``own [N, K]`` = ``<e, p_{y,k}>``
        (not differentiable; the Sinkhorn input).
    """
    return _ClassMaxSimilarity.apply(emb, protos.detach().to(emb.dtype), labels, num_classes, budget)


class _PrototypeContrast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emb, protos, target, temperature, budget):
        valid = target >= 0
        safe = torch.where(valid, target, torch.zeros_like(target))
        ppc = emb.new_zeros(())
        ppd = emb.new_zeros(())
        for sl in _chunks(emb.shape[0], protos.shape[0], budget):
            sims = emb[sl] @ protos.t()
            picked = sims.gather(1, safe[sl].unsqueeze(1)).squeeze(1)
            keep = valid[sl].to(sims.dtype)
            ppc += ((torch.logsumexp(sims / temperature, dim=1) - picked / temperature) * keep).sum()
            ppd += ((1 - picked).pow(2) * keep).sum()
        ctx.save_for_backward(emb, protos, safe, valid)
        ctx.temperature, ctx.budget = temperature, budget
        return ppc, ppd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ppc, grad_ppd):
        emb, protos, safe, valid = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(emb)
        for sl in _chunks(emb.shape[0], protos.shape[0], ctx.budget):
            sims = emb[sl] @ protos.t()
            index = safe[sl].unsqueeze(1)
            picked = sims.gather(1, index)
            g = torch.softmax(sims / t, dim=1).mul_(grad_ppc / t)
            g.scatter_add_(1, index, -grad_ppc / t - 2 * grad_ppd * (1 - picked))
            g.mul_(valid[sl].unsqueeze(1).to(g.dtype))
            grad[sl] = g @ protos
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
    """
    return _PrototypeContrast.apply(emb, protos.detach().to(emb.dtype), target, temperature, budget)
