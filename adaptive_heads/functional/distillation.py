"""The distillation terms of CAC and SSA-Seg: per-pixel response distillation (entropy-weighted, class-balanced,
optionally split at the label boundary) and SSA-Seg's semantic-relation and spatial (position) terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._precision import float32_math, upcast_half
from .._validation import check_choice
from .labels import label_boundary
from .reductions import classwise_weighted_mean

__all__ = [
    "boundary_distillation",
    "context_aware_distillation",
    "position_distillation",
    "relation_distillation",
    "soft_distillation",
]


def soft_distillation(
    student: Tensor,
    teacher: Tensor,
    feature_target: Tensor,
    *,
    ignore_index: int | None = 255,
    mix: float = 0.5,
    mode: str = "mixed",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel distillation loss and teacher-entropy weight (CAC's and SSA-Seg's response distillation).

    With ``q = softmax(teacher)`` (teacher detached here):

    - ``mode="mixed"`` (official code of both): ``ℓ = -Σ_j s_j log softmax(student)_j`` with
      ``s = mix·q + (1-mix)·onehot(t)`` — a soft cross-entropy, not a KL;
    - ``mode="kl"`` (CAC paper Eq. 10): ``ℓ = KL(q ‖ softmax(student))``.

    Args:
        student: ``[B, n, h, w]`` logits (receive gradient).
        teacher: ``[B, n, h, w]`` logits.
        feature_target: ``[B, h, w]`` labels at the logits' resolution.

    Returns:
        ``(loss, entropy, valid)``, each ``[B, h, w]``: ``ℓ``, the teacher entropy ``H(q)`` (0 on ignored
        pixels) and the valid-pixel mask; float32 (float64 for float64 input).

    Example:
        >>> student = torch.zeros(1, 2, 1, 1)
        >>> teacher = torch.tensor([[[[5.0]], [[-5.0]]]])
        >>> loss, entropy, valid = soft_distillation(student, teacher, torch.tensor([[[0]]]))
        >>> round(loss.item(), 4)  # -log(1/2): any target against a uniform student
        0.6931
    """
    check_choice("mode", mode, ("mixed", "kl"))
    n = student.shape[1]
    with float32_math(student.device):
        log_p = torch.log_softmax(upcast_half(student), dim=1)
        log_q = torch.log_softmax(upcast_half(teacher.detach()), dim=1).to(log_p.dtype)
        q = log_q.exp()
        valid = (feature_target >= 0) & (feature_target < n)
        if ignore_index is not None:
            valid &= feature_target != ignore_index
        entropy = -(q * log_q).sum(dim=1) * valid
        if mode == "mixed":
            safe = torch.where(valid, feature_target, torch.zeros_like(feature_target))
            hard = log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
            loss = -(mix * (q * log_p).sum(dim=1) + (1.0 - mix) * hard)
        else:
            loss = (q * (log_q - log_p)).sum(dim=1)
    return loss, entropy, valid


def context_aware_distillation(
    student: Tensor,
    teacher: Tensor,
    feature_target: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    mix: float = 0.5,
    mode: str = "mixed",
    class_average: str = "present",
    eps: float = 1e-12,
) -> Tensor:
    """Entropy-weighted, class-balanced distillation of ``teacher`` into ``student`` (feature resolution).

    Per pixel: :func:`~adaptive_heads.functional.soft_distillation` (``mode="mixed"``: the official soft CE
    against ``mix·softmax(teacher) + (1-mix)·onehot``; ``mode="kl"``: the paper's KL). Each pixel is
    weighted by the teacher entropy ``H(q)`` (zero on ignored pixels) and the result is averaged per class,
    then over the classes present in ``feature_target`` (``class_average="present"``, official) or over all n
    (``"all"``, paper Eq. 11). See
    :func:`~adaptive_heads.functional.classwise_weighted_mean`.

    Args:
        student: ``[B, n, h, w]`` logits (receive gradient).
        teacher: ``[B, n, h, w]`` logits (detached here).
        feature_target: ``[B, h, w]`` labels at the logits' resolution.

    Returns:
        A scalar; 0 when no pixel is valid.

    Example:
        >>> student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> target = torch.randint(0, 3, (2, 4, 4))
        >>> context_aware_distillation(student, teacher, target, 3).shape
        torch.Size([])
    """
    per_pixel, entropy, _ = soft_distillation(
        student, teacher, feature_target, ignore_index=ignore_index, mix=mix, mode=mode
    )
    with float32_math(student.device):
        return classwise_weighted_mean(
            per_pixel,
            entropy,
            feature_target,
            num_classes,
            ignore_index=ignore_index,
            average=class_average,
            eps=eps,
        )


def boundary_distillation(
    student: Tensor,
    teacher: Tensor,
    feature_target: Tensor,
    num_classes: int,
    *,
    ignore_index: int | None = 255,
    mix: float = 0.5,
    boundary: Tensor | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """SSA-Seg's response distillation ("KLLoss"), at feature resolution.

    The per-pixel soft CE toward ``mix·softmax(teacher) + (1-mix)·onehot`` weighted by the teacher entropy
    (:func:`~adaptive_heads.functional.soft_distillation`), averaged per class separately over the boundary
    band ``β`` and the interior ``1-β``; ``L_c = (L_boundary,c + L_interior,c) / 2``, averaged over the classes
    present in the batch. 0 when no pixel is valid. Always float32 (the official code leaks float64).

    Args:
        student: ``[B, n, h, w]`` logits.
        teacher: ``[B, n, h, w]`` logits (detached).
        feature_target: ``[B, h, w]`` labels.
        num_classes: n.
        ignore_index: ignored label.
        mix: teacher share of the soft target (official 0.5).
        boundary: ``[B, h, w]`` band; default :func:`label_boundary` of ``feature_target``.

    Example:
        >>> student, teacher = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
        >>> target = torch.zeros(1, 16, 16, dtype=torch.long)
        >>> target[:, :, 8:] = 2
        >>> bool(boundary_distillation(student, teacher, target, 3) > 0)
        True
    """
    loss, entropy, _ = soft_distillation(student, teacher, feature_target, ignore_index=ignore_index, mix=mix)
    beta = label_boundary(feature_target) if boundary is None else boundary
    with float32_math(student.device):
        beta = beta.to(loss.dtype)
        edge = classwise_weighted_mean(
            loss, entropy * beta, feature_target, num_classes, ignore_index=ignore_index, eps=eps
        )
        inner = classwise_weighted_mean(
            loss, entropy * (1 - beta), feature_target, num_classes, ignore_index=ignore_index, eps=eps
        )
        return 0.5 * (edge + inner)


def relation_distillation(student: Tensor, teacher: Tensor, scale: float = 15.0) -> Tensor:
    """SSA-Seg's semantic-domain distillation (``disLoss``, weight 10 in :class:`SSALoss`).

    ``R(Z) = softmax_rows(scale · Ẑ · stopgrad(Ẑ)ᵀ)`` with ``Ẑ`` the L2-normalised ``[B, n, C]`` prototypes;
    the loss is ``mean_{b,k} Σ_{j≠k} relu(R(S)[k, j] − R(T)[k, j])`` with the teacher ``T`` detached: the
    student is only penalised where its inter-class similarity exceeds the teacher's.

    Example:
        >>> teacher = torch.randn(2, 4, 8)
        >>> relation_distillation(teacher.clone(), teacher)  # equal relations cost nothing
        tensor(0.)
    """

    def relation(z: Tensor) -> Tensor:
        z = F.normalize(upcast_half(z), dim=-1)
        return torch.softmax(scale * z @ z.detach().transpose(-1, -2), dim=-1)

    with float32_math(student.device):
        r_s = relation(student)
        r_t = relation(teacher.detach()).expand_as(r_s)
        off_diagonal = 1 - torch.eye(r_s.shape[-1], device=r_s.device, dtype=r_s.dtype)
        return torch.relu((r_s - r_t) * off_diagonal).sum(-1).mean()


def position_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """SSA-Seg's spatial-domain distillation (``pos_disLoss``, weight 0.4 in :class:`SSALoss`).

    ``mean_{b,k} [−Σ_c softmax_c(T)[k, c] · log_softmax_c(S)[k, c]]``: a soft CE over the **channel** axis of
    each ``[B, n, C]`` prototype, teacher detached, all n classes included.

    Example:
        >>> student, teacher = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
        >>> round(position_distillation(student, teacher).item(), 4)  # log(4): uniform against uniform
        1.3863
    """
    with float32_math(student.device):
        log_s = torch.log_softmax(upcast_half(student), dim=-1)
        q = torch.softmax(upcast_half(teacher.detach()), dim=-1).expand_as(log_s)
        return -(q * log_s).sum(-1).mean()
