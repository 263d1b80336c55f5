"""Slow ProtoSeg reference written from the official algorithm (protoseg.md §3): loop over classes,
boolean indexing, one Sinkhorn call per class. Used only by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sinkhorn(out: torch.Tensor, iters: int = 3, eps: float = 0.05) -> torch.Tensor:
    plan = torch.exp(out / eps).t()  # [K, N_k]
    n_pixels, k = plan.shape[1], plan.shape[0]
    plan = plan / plan.sum()
    for _ in range(iters):
        plan = plan / plan.sum(dim=1, keepdim=True) / k
        plan = plan / plan.sum(dim=0, keepdim=True) / n_pixels
    return (plan * n_pixels).t()


def prototype_learning(head, emb: torch.Tensor, seg: torch.Tensor, gt: torch.Tensor, ignore: int = 255, masks=None):
    """Argmax-assignment version of the official update. ``emb [N, D]`` unit embeddings, ``seg [N, n]``
    mask_norm logits, ``gt [N]`` labels, ``masks [N, K, n]`` the cosines if already computed (as the official
    code passes them). Returns (new prototypes [n, K, D], targets [N] with -1 = ignored)."""
    n, k = head.num_classes, head.num_prototypes
    protos = F.normalize(head.prototypes.clone(), dim=-1)
    if masks is None:
        masks = torch.einsum("nd,ckd->nkc", emb, protos)  # [N, K, n], the official layout
    correct = gt == seg.argmax(1)
    target = torch.full_like(gt, -1)
    for c in range(n):
        sel = gt == c
        if sel.sum() == 0:
            continue
        plan = sinkhorn(masks[..., c][sel], head.sinkhorn_iters, head.sinkhorn_eps)
        idx = plan.argmax(1)
        q = F.one_hot(idx, k).to(emb.dtype)
        m_k = correct[sel].to(emb.dtype)
        f = (q * m_k[:, None]).t() @ (emb[sel] * m_k[:, None])
        counts = (q * m_k[:, None]).sum(0)
        if counts.sum() > 0 and head.update_prototypes:
            f = F.normalize(f, dim=-1)
            upd = counts != 0
            protos[c, upd] = head.gamma * protos[c, upd] + (1 - head.gamma) * f[upd]
        target[sel] = idx + k * c
    return F.normalize(protos, dim=-1), target
