"""The distillation terms of CAC and SSA-Seg: per-pixel response distillation (entropy-weighted, class-balanced,
optionally split at the label boundary) and SSA-Seg's semantic-relation and spatial (position) terms."""

from __future__ import annotations

import torch
from torch import Tensor

from .._precision import float32_math, upcast_half
from .._validation import check_choice
from .labels import label_boundary, valid_labels

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


def _with_grad(student: Tensor) -> bool:
    return torch.is_grad_enabled() and student.requires_grad


class _ClasswiseDistillation(torch.autograd.Function):
    """The class-balanced, entropy-weighted response distillation of CAC and SSA-Seg in one pass, its gradient with
    respect to the student logits computed in the same pass (the loss is a scalar).

    Per pixel ``i``: ``ℓ_i`` of :func:`soft_distillation` and the teacher entropy ``H_i`` (0 where ignored). For each
    pixel group ``g`` (SSA-Seg's boundary band and interior; CAC: one group of every pixel) with pixel weights
    ``w_gi = H_i · group_gi``: ``L_g = 1/(|K| + eps) · Σ_{k∈K} Σ_i 1[t_i=k] w_gi ℓ_i / (Σ_i 1[t_i=k] w_gi + eps)``
    over the classes ``K`` present (``class_average="present"``) or all ``n`` (``"all"``); the loss is the mean of
    the ``L_g``. Per-class sums are one ``index_add`` over the labels (no loop, no host sync)."""

    @staticmethod
    def forward(
        ctx, student, teacher, labels, groups, num_classes, ignore_index, mix, mode, class_average, eps, with_grad
    ):
        log_p = torch.log_softmax(upcast_half(student), dim=1)
        if mode == "mixed":
            q = torch.softmax(upcast_half(teacher), dim=1).to(log_p.dtype)
        else:
            log_q = torch.log_softmax(upcast_half(teacher), dim=1).to(log_p.dtype)
            q = log_q.exp()
        safe, valid = valid_labels(labels, num_classes, ignore_index)
        counted = valid.to(q.dtype)
        slot = safe.flatten()  # an ignored pixel adds 0 to its bin (its weights and count are 0)
        entropy = torch.special.entr(q).sum(dim=1).mul_(counted)  # [B, h, w], 0 where ignored
        if mode == "mixed":  # the soft target mix·q + (1−mix)·onehot, in place of q (ignored pixels: weight 0)
            soft = q.mul_(mix).scatter_add_(1, safe.unsqueeze(1), counted.unsqueeze(1) * (1.0 - mix))
        else:
            soft = q
        # −ℓ: the soft CE's (or the KL's) sign is carried by the class weights below
        neg_loss = (soft * log_p).sum(dim=1) if mode == "mixed" else (q * (log_p - log_q)).sum(dim=1)
        weights = entropy.unsqueeze(0) if groups is None else groups * entropy  # [G, B, h, w]
        g = weights.shape[0]
        columns = torch.cat([weights * neg_loss, weights, counted.unsqueeze(0)]).flatten(1)  # [2G + 1, N]
        stats = neg_loss.new_zeros(2 * g + 1, num_classes).index_add_(1, slot, columns)  # [2G + 1, n]
        present = stats[-1] > 0
        classes = present.sum() + eps if class_average == "present" else float(num_classes)
        # −1 / (G · (|K| + eps) · (Σ_i 1[t_i=k] w_gi + eps)) for the present classes, 0 elsewhere: ∂total/∂(w_gi ℓ_i)
        per_class = present / (stats[g : 2 * g] + eps).mul_(classes * -g)  # [G, n]
        total = torch.linalg.vecdot(stats[:g].flatten(), per_class.flatten())
        if with_grad:  # ∂ℓ_i/∂s = softmax(s) − target (mixed: the soft target; KL: q), times −Σ_g w_gi per_class
            coef = weights.flatten(1).mul_(per_class[:, slot]).sum(dim=0).view_as(neg_loss).unsqueeze(1)
            grad = log_p.exp_().sub_(soft).mul_(coef.neg())
            ctx.save_for_backward(grad.to(student.dtype))
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None, None, None, None, None, None


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
    (``"all"``, paper Eq. 11): :func:`~adaptive_heads.functional.classwise_weighted_mean` of the two, in one pass
    with its gradient written out.

    Args:
        student: ``[B, n, h, w]`` logits (receive gradient).
        teacher: ``[B, n, h, w]`` logits (detached here).
        feature_target: ``[B, h, w]`` labels at the logits' resolution.

    Returns:
        A scalar (float32, float64 for float64 logits); 0 when no pixel is valid.

    Example:
        >>> student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> target = torch.randint(0, 3, (2, 4, 4))
        >>> from adaptive_heads.functional import classwise_weighted_mean
        >>> per_pixel, entropy, _ = soft_distillation(student, teacher, target)
        >>> torch.allclose(context_aware_distillation(student, teacher, target, 3),
        ...                classwise_weighted_mean(per_pixel, entropy, target, 3))
        True
    """
    check_choice("mode", mode, ("mixed", "kl"))
    check_choice("class_average", class_average, ("present", "all"))
    with float32_math(student.device):
        return _ClasswiseDistillation.apply(
            student, teacher.detach(), feature_target, None, num_classes, ignore_index, mix, mode, class_average, eps,
            _with_grad(student),
        )  # fmt: skip


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
    beta = label_boundary(feature_target) if boundary is None else boundary
    with float32_math(student.device):
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        beta = beta.to(dtype)
        groups = torch.stack([beta, 1 - beta])  # the boundary band and the interior
        return _ClasswiseDistillation.apply(
            student, teacher.detach(), feature_target, groups, num_classes, ignore_index, mix, "mixed", "present", eps,
            _with_grad(student),
        )  # fmt: skip


class _RelationDistillation(torch.autograd.Function):
    """:func:`relation_distillation`'s value and its gradient with respect to the student, in one pass."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, scale: float, with_grad: bool) -> Tensor:
        b = student.shape[0]
        both = torch.cat([upcast_half(student), upcast_half(teacher).expand(student.shape)])  # [2B, n, C]
        divisor = torch.linalg.vector_norm(both, dim=-1, keepdim=True).clamp_min_(1e-12)
        unit = both / divisor  # F.normalize
        logits = torch.baddbmm(unit.new_empty(()), unit, unit.transpose(1, 2), beta=0, alpha=scale)
        relations = torch.softmax(logits, dim=-1)
        r_s, r_t, s_hat, s_div = relations[:b], relations[b:], unit[:b], divisor[:b]
        excess = r_s - r_t
        excess.diagonal(dim1=1, dim2=2).zero_()  # j ≠ k
        mean = 1.0 / (excess.shape[0] * excess.shape[1])
        loss = excess.clamp_min_(0).sum() * mean
        if with_grad:  # through the softmax, then the left factor scale·ŝ (the right one is detached), then L2
            logits_grad = torch._softmax_backward_data(excess.sign_(), r_s, -1, r_s.dtype)  # 1 where the hinge is on
            s_hat_grad = torch.baddbmm(s_hat.new_empty(()), logits_grad, s_hat, beta=0, alpha=scale * mean)
            along = torch.linalg.vecdot(s_hat, s_hat_grad).unsqueeze(-1).masked_fill_(s_div <= 1e-12, 0.0)
            grad = s_hat_grad.addcmul_(s_hat, along, value=-1.0).div_(s_div)
            ctx.save_for_backward(grad.to(student.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def relation_distillation(student: Tensor, teacher: Tensor, scale: float = 15.0) -> Tensor:
    """SSA-Seg's semantic-domain distillation (``disLoss``, weight 10 in :class:`SSALoss`).

    ``R(Z) = softmax_rows(scale · Ẑ · stopgrad(Ẑ)ᵀ)`` with ``Ẑ`` the L2-normalised ``[B, n, C]`` prototypes;
    the loss is ``mean_{b,k} Σ_{j≠k} relu(R(S)[k, j] − R(T)[k, j])`` with the teacher ``T`` detached (``[B, n, C]``
    or one ``[n, C]`` for the batch): the student is only penalised where its inter-class similarity exceeds the
    teacher's. Computed with its gradient in one pass (float32, float64 for float64 input).

    Example:
        >>> teacher = torch.randn(2, 4, 8)
        >>> relation_distillation(teacher.clone(), teacher)  # equal relations cost nothing
        tensor(0.)
    """
    with float32_math(student.device):
        return _RelationDistillation.apply(student, teacher.detach(), float(scale), _with_grad(student))


class _PositionDistillation(torch.autograd.Function):
    """:func:`position_distillation`'s value and its gradient with respect to the student, in one pass."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, with_grad: bool) -> Tensor:
        log_s = torch.log_softmax(upcast_half(student), dim=-1)
        q = torch.softmax(upcast_half(teacher), dim=-1).expand_as(log_s).contiguous()
        mean = 1.0 / (log_s.numel() // log_s.shape[-1])
        loss = torch.dot(q.flatten(), log_s.flatten()) * -mean
        if with_grad:  # (softmax(S) − q) / (B·n)
            ctx.save_for_backward(log_s.exp_().sub_(q).mul_(mean).to(student.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None


def position_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """SSA-Seg's spatial-domain distillation (``pos_disLoss``, weight 0.4 in :class:`SSALoss`).

    ``mean_{b,k} [−Σ_c softmax_c(T)[k, c] · log_softmax_c(S)[k, c]]``: a soft CE over the **channel** axis of
    each ``[B, n, C]`` prototype, teacher detached, all n classes included. Computed with its gradient in one pass.

    Example:
        >>> student, teacher = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
        >>> round(position_distillation(student, teacher).item(), 4)  # log(4): uniform against uniform
        1.3863
    """
    with float32_math(student.device):
        return _PositionDistillation.apply(student, teacher.detach(), _with_grad(student))
