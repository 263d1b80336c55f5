"""Training steps written the way the official code is: Python loops over the classes present (and over
images), ``unique()``, boolean masks, full-resolution upsampled CE terms (``F.interpolate`` +
``F.cross_entropy``), and for ProtoSeg the official embedding path composed with autograd and the cosines
computed twice (``[N, K, n]`` for the class max, ``[N, n·K]`` for PPC/PPD), as ``protoseg.md`` describes. Used
to measure the speed-up of the vectorised heads; the loop bodies come from the test references
(``tests/reference_*.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaptive_heads.functional import label_boundary, position_distillation, relation_distillation
from tests import reference_cac, reference_protoseg, reference_ssa


def _ce(logits, target, align_corners=True):
    up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, target, ignore_index=255)


def cac_step(head, feat, target):
    p = head.conv_seg(head.dropout(feat))
    p_p = reference_cac.estimated_logits(head, feat, p)
    p_y = reference_cac.oracle_logits(head, feat, target)
    loss = _ce(p, target) + _ce(p_p, target, False) + _ce(p_y, target)
    loss = loss + reference_cac.distill_loss(p_p, p_y, target)
    loss.backward()


def ssa_step(head, feat, target):
    out = reference_ssa.forward(head, feat, target)
    beta = label_boundary(out["feature_target"]).to(feat.dtype)
    loss = _ce(out["logits"], target) + _ce(out["coarse"], target) + _ce(out["teacher"], target)
    loss = loss + reference_ssa.distill(out["logits"], out["teacher"], out["feature_target"], beta)
    loss = loss + reference_ssa.dice(out["logits"], target) + reference_ssa.dice(out["teacher"], target)
    loss = loss + 10 * relation_distillation(out["semantic"], out["semantic_teacher"])
    loss = loss + 0.4 * position_distillation(out["position"], out["position_teacher"])
    loss.backward()


def proto_step(head, feat, target):
    conv1, relu, conv2 = head.proj_head.proj  # the official embedding path, composed with autograd
    y = F.normalize(conv2(relu(conv1(feat))), dim=1)
    b, d, h, w = y.shape
    flat = F.normalize(head.feat_norm(y.permute(0, 2, 3, 1).reshape(-1, d)), dim=-1)
    protos = F.normalize(head.prototypes, dim=-1)  # [n, K, D]
    masks = torch.einsum("nd,ckd->nkc", flat, protos)  # [N, K, n]: the official class-max layout
    seg = head.mask_norm(masks.amax(1))
    contrast_logits = flat @ protos.reshape(-1, d).t()  # [N, n*K]: the same cosines again, for PPC/PPD
    gt = F.interpolate(target[:, None].float(), size=(h, w), mode="nearest").long().reshape(-1)
    with torch.no_grad():
        new_protos, proto_target = reference_protoseg.prototype_learning(
            head, flat.detach(), seg.detach(), gt, masks=masks.detach()
        )
        head.prototypes.copy_(new_protos)
    seg_map = seg.view(b, h, w, -1).permute(0, 3, 1, 2)
    ppc = F.cross_entropy(contrast_logits, proto_target, ignore_index=-1)
    keep = proto_target != -1
    ppd = (1 - contrast_logits[keep].gather(1, proto_target[keep][:, None])).pow(2).mean()
    (_ce(seg_map, target) + 0.01 * ppc + 0.001 * ppd).backward()


STEPS = {"cac": cac_step, "ssa": ssa_step, "proto": proto_step}
