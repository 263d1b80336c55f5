"""Class-wise Sinkhorn–Knopp (ProtoSeg's online clustering), for all classes at once.

For every class k, ProtoSeg balances the assignment of that class's ``N_k`` pixels to its K prototypes:
starting from ``L = exp(S / eps)`` (``S`` the ``[N_k, K]`` cosines), it alternates

- prototype (row) normalisation: each prototype receives total mass ``1/K``,
- pixel (column) normalisation: each pixel has total mass ``1/N_k``,

and finally scales by ``N_k`` so each pixel's assignment sums to 1 (equipartition: every prototype gets
``≈ N_k / K`` pixels' worth of mass). Here all classes run together: the per-class sums over pixels are
segment reductions indexed by the label, the whole iteration is done in the log domain in float32 (with a
per-segment max), so tiny ``eps`` cannot overflow or underflow, and there is no loop over classes and no
host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._distributed import all_reduce_
from .._precision import upcast_half

__all__ = ["classwise_sinkhorn"]


def _segment_logsumexp(values: Tensor, segments: Tensor, num_segments: int, sync: bool) -> Tensor:
    """``out[s, j] = log Σ_{i: segments[i]=s} exp(values[i, j])`` → ``[num_segments, K]`` (-inf if empty)."""
    index = segments.unsqueeze(1).expand_as(values)
    seg_max = values.new_full((num_segments, values.shape[1]), float("-inf"))
    seg_max = seg_max.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    if sync:
        all_reduce_(seg_max, "max")
    shift = seg_max.nan_to_num(neginf=0.0)  # empty segments: any finite shift works
    sums = values.new_zeros((num_segments, values.shape[1])).index_add_(0, segments, (values - shift[segments]).exp())
    if sync:
        all_reduce_(sums, "sum")
    return shift + sums.log()


@torch.no_grad()
def classwise_sinkhorn(
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    iters: int = 3,
    eps: float = 0.05,
    sync: bool = False,
) -> Tensor:
    """Sinkhorn–Knopp transport plan of every pixel over its own class's K prototypes.

    Args:
        scores: ``[N, K]`` similarity of each pixel to the K prototypes of its label's class.
        labels: ``[N]`` class of each pixel; values outside ``[0, num_classes)`` (ignored pixels) are left out.
        num_classes: n.
        iters: Sinkhorn iterations (official 3).
        eps: entropic regularisation; the kernel is ``exp(scores / eps)`` (official 0.05).
        sync: all-reduce the per-class statistics over ``torch.distributed`` ranks, so the plan equals the
            one computed on the concatenation of every rank's pixels (the official code does not sync).

    Returns:
        ``[N, K]`` plan (float32; float64 for float64 scores); each valid pixel's row sums to 1, ignored
        pixels' rows are 0.

    Example:
        >>> scores = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 0.8]])  # 4 pixels, K = 2
        >>> plan = classwise_sinkhorn(scores, torch.tensor([0, 0, 0, 0]), num_classes=1)
        >>> plan.argmax(dim=1).tolist(), torch.allclose(plan.sum(dim=1), torch.ones(4))
        ([0, 0, 1, 1], True)
    """
    k = scores.shape[1]
    valid = (labels >= 0) & (labels < num_classes)
    segments = torch.where(valid, labels, torch.full_like(labels, num_classes))  # extra bin for ignored
    logits = upcast_half(scores) / eps
    counts = logits.new_zeros(num_classes + 1).index_add_(0, segments, torch.ones_like(logits[:, 0]))
    if sync:
        all_reduce_(counts, "sum")
    log_count = counts.clamp_min(1).log()[segments].unsqueeze(1)  # log N_k of each pixel's class
    log_k = math.log(k)
    for _ in range(iters):
        logits = logits - _segment_logsumexp(logits, segments, num_classes + 1, sync)[segments] - log_k
        logits = logits - torch.logsumexp(logits, dim=1, keepdim=True) - log_count
    plan = (logits + log_count).exp()
    return plan * valid.unsqueeze(1)
