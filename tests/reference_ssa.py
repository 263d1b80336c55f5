"""Slow SSA-Seg reference written from the formulas of the official code (ssa.md §3–§5): loops over images
and classes, ``unique()``, explicit one-hot masks. Used only by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cos15(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x [C, N], q [n, C] -> [n, N]"""
    xn = x / (x.norm(dim=0, keepdim=True) + 1e-12)
    qn = q / (q.norm(dim=-1, keepdim=True) + 1e-12)
    return 15.0 * qn @ xn


def forward(head, feat: torch.Tensor, y: torch.Tensor, ignore: int = 255) -> dict:
    b, c, h, w = feat.shape
    n = head.num_classes
    weight = head.conv_seg.weight.reshape(n, c)
    basis = head.center_pos.weight
    coarse = head.conv_seg(feat)
    pos = head.get_feat_pos(feat)
    y_s = F.interpolate(y[:, None].double(), size=(h, w), mode="nearest")[:, 0].long()

    gt_sem = weight.detach().clone()
    for k in [int(v) for v in y_s.unique() if int(v) != ignore]:
        mask = (y_s == k)[:, None].to(feat.dtype)
        gt_sem = gt_sem.index_copy(
            0, torch.tensor([k], device=feat.device), ((feat * mask).sum((0, 2, 3)) / (mask.sum() + 1e-12))[None]
        )
    sem_t = head.gt_center_content_proj(torch.cat([gt_sem, weight], -1))

    out = {k: [] for k in ("logits", "teacher", "semantic", "position", "position_teacher")}
    for i in range(b):
        m = coarse[i].reshape(n, -1)
        f = feat[i].reshape(c, -1)
        pf = pos[i].reshape(c, -1)
        a_sp = torch.softmax(m, dim=-1)
        pos_c = a_sp @ pf.t()
        pos_p = head.center_pos_proj(torch.cat([basis, pos_c], -1))
        a_sem = torch.softmax(m, dim=0)
        sem_c = (a_sem @ f.t()) / (a_sem.sum(-1, keepdim=True) + 1e-12)
        sem_p = head.center_content_proj(torch.cat([sem_c, weight], -1))
        x = f + pf
        out["logits"].append(_cos15(x, head.center_proj(sem_p + pos_p)).view(n, h, w))
        gt_pos = basis.detach().clone()
        for k in [int(v) for v in y_s[i].unique() if int(v) != ignore]:
            mask = (y_s[i] == k).reshape(-1).to(feat.dtype)
            gt_pos = gt_pos.index_copy(
                0, torch.tensor([k], device=feat.device), ((pf * mask).sum(-1) / (mask.sum() + 1e-12))[None]
            )
        pos_t = head.gt_center_pos_proj(torch.cat([gt_pos, basis], -1))
        out["teacher"].append(_cos15(x, head.gt_center_proj(sem_t + pos_t)).view(n, h, w))
        out["semantic"].append(sem_p)
        out["position"].append(pos_p)
        out["position_teacher"].append(pos_t)
    result = {k: torch.stack(v) for k, v in out.items()}
    result["semantic_teacher"] = sem_t.expand(b, -1, -1)
    result["coarse"] = coarse
    result["feature_target"] = y_s
    return result


def distill(student, teacher, t, beta, ignore: int = 255) -> torch.Tensor:
    n = student.shape[1]
    onehot_t = t.clone()
    onehot_t[onehot_t == ignore] = 0
    onehot = F.one_hot(onehot_t, n).permute(0, 3, 1, 2).to(student.dtype)
    q = torch.softmax(teacher.detach(), 1)
    loss_map = -((0.5 * q + 0.5 * onehot) * torch.log_softmax(student, 1)).sum(1)
    ent = -(q * torch.log(q)).sum(1) * (t != ignore)
    classes = [int(k) for k in t.unique() if int(k) != ignore]
    total = 0.0
    for k in classes:
        m = (t == k).to(student.dtype)
        l1 = (loss_map * ent * m * beta).sum() / ((ent * m * beta).sum() + 1e-12)
        l2 = (loss_map * ent * m * (1 - beta)).sum() / ((ent * m * (1 - beta)).sum() + 1e-12)
        total = total + (l1 + l2) / 2
    return total / (len(classes) + 1e-12)


def dice(logits, y, ignore: int = 255) -> torch.Tensor:
    up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=True)
    losses = []
    for i in range(y.shape[0]):
        for k in [int(v) for v in y[i].unique() if int(v) != ignore]:
            s = torch.sigmoid(up[i, k]).flatten()
            t = (y[i] == k).flatten().to(s.dtype)
            losses.append(1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1))
    return torch.stack(losses).sum() / max(len(losses), 1)


def relation(student, teacher) -> torch.Tensor:
    total, count = 0.0, 0
    for i in range(student.shape[0]):
        zs = F.normalize(student[i], dim=-1)
        zt = F.normalize(teacher[i].detach(), dim=-1)
        rs = torch.softmax(15 * zs @ zs.detach().t(), -1)
        rt = torch.softmax(15 * zt @ zt.t(), -1)
        for k in range(rs.shape[0]):
            for j in range(rs.shape[1]):
                if j != k:
                    total = total + torch.relu(rs[k, j] - rt[k, j])
            count += 1
    return total / count


def position(student, teacher) -> torch.Tensor:
    total, count = 0.0, 0
    for i in range(student.shape[0]):
        for k in range(student.shape[1]):
            q = torch.softmax(teacher[i, k].detach(), -1)
            total = total - (q * torch.log_softmax(student[i, k], -1)).sum()
            count += 1
    return total / count
