"""Class-wise Sinkhorn–Knopp (ProtoSeg's online clustering), for all classes at once.

For every class k, ProtoSeg balances the assignment of that class's ``N_k`` pixels to its K prototypes:
starting from ``L = exp(S / eps)`` (``S`` the ``[N_k, K]`` cosines), it alternates

- prototype (row) normalisation: each prototype receives total mass ``1/K``,
- pixel (column) normalisation: each pixel has total mass ``1/N_k``,

and finally scales by ``N_k`` so each pixel's assignment sums to 1 (equipartition: every prototype gets
``≈ N_k / K`` pixels' worth of mass). Here all classes run together: the per-class sums over pixels are
segment sums indexed by the label (one ``index_add`` per iteration), with no loop over classes and no host
synchronisation. Each normalisation is invariant to a constant factor per class, so the kernel is taken relative to
each class's peak score (``exp((S − max) / eps)``, in float32, at most 1) and the constants ``1/K``, ``1/N_k`` drop
out. The exponent is floored at −80 (``e^−80 ≈ 2e−35``, far below float32's resolution next to the peak's 1): exact
whenever the class's scores span less than ``80·eps`` (cosines span at most 2: every ``eps ≥ 0.025``, the official
0.05 included), finite for any ``eps``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._distributed import all_reduce_
from .._precision import upcast_half

__all__ = ["classwise_sinkhorn"]

#: the floor of the kernel's exponent (see the module docstring)
MIN_EXPONENT = -80.0


@torch.no_grad()
def classwise_sinkhorn(
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    iters: int = 3,
    eps: float = 0.05,
    sync: bool = False,
    valid: Tensor | None = None,
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
        valid: ``[N]`` bool, which pixels count, where the caller knows it already (``labels`` then any class for
            the others).

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
    if valid is None:
        valid = (labels >= 0) & (labels < num_classes)
    segments = torch.where(valid, labels, num_classes)  # an extra segment for the ignored pixels
    logits = upcast_half(scores) / eps
    peak = logits.new_full((num_classes + 1,), float("-inf")).scatter_reduce_(
        0, segments, logits.amax(dim=1), reduce="amax"
    )
    if sync:
        all_reduce_(peak, "max")
    plan = (logits - peak[segments].unsqueeze(1)).clamp_min_(MIN_EXPONENT).exp_()
    for _ in range(iters):
        prototype_mass = plan.new_zeros(num_classes + 1, k).index_add_(0, segments, plan)  # per class, per prototype
        if sync:
            all_reduce_(prototype_mass, "sum")
        plan.div_(prototype_mass[segments])
        plan.div_(plan.sum(dim=1, keepdim=True))  # each pixel's assignment sums to 1
    return plan * valid.unsqueeze(1)
