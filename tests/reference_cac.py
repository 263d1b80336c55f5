"""Slow, loop-based CAC written straight from the formulas of the official code (cac.md §3, §5).

Used only by the tests, to check the vectorised implementation. Loops over images and classes, calls
``unique()``, builds explicit one-hot tensors: everything the library avoids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_labels(y: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long()


def estimated_logits(head, feat: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    b, c, h, w = feat.shape
    n = p.shape[1]
    weight = head.conv_seg.weight.reshape(n, c)
    x = feat.clone().view(b, c, h * w)
    probs = torch.softmax(p.view(b, n, h * w), dim=1)
    out = []
    for i in range(b):
        proto = (probs[i] @ x[i].t()) / (probs[i].sum(-1, keepdim=True) + 1e-12)  # [n, C]
        a = head.proj(torch.cat([proto, weight], dim=-1))
        a_hat = a / (a.norm(dim=-1, keepdim=True) + 1e-12)
        x_hat = x[i] / (x[i].norm(dim=0, keepdim=True) + 1e-12)
        out.append(15.0 * (a_hat @ x_hat))
    return torch.stack(out).view(b, n, h, w)


def oracle_logits(head, feat: torch.Tensor, y: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    _b, c, h, w = feat.shape
    n = head.num_classes
    proto = head.conv_seg.weight.reshape(n, c)
    new_proto = proto.detach().clone()
    y_small = nearest_labels(y, (h, w))[:, None]
    classes = [int(k) for k in y_small.unique() if int(k) != ignore]
    for k in classes:
        mask = (y_small == k).float()
        pooled = (feat * mask).sum((0, 2, 3)) / (mask.sum() + 1e-12)
        e_k = torch.zeros(n, 1, dtype=feat.dtype, device=feat.device)
        e_k[k] = 1
        new_proto = new_proto * (1 - e_k) + pooled[None] * e_k
    a = head.apd_proj(torch.cat([new_proto, proto], dim=-1))
    a = F.normalize(a, p=2, dim=-1)
    x = F.normalize(feat, p=2, dim=1)
    return 15.0 * F.conv2d(x, a[:, :, None, None])


def distill_loss(pred: torch.Tensor, soft: torch.Tensor, y: torch.Tensor, ignore: int = 255) -> torch.Tensor:
    _b, n, h, w = pred.shape
    t = nearest_labels(y, (h, w))
    onehot_t = t.clone()
    onehot_t[onehot_t == ignore] = 0
    onehot = F.one_hot(onehot_t, n).permute(0, 3, 1, 2).to(pred.dtype)
    q = torch.softmax(soft.detach(), dim=1)
    s = 0.5 * q + 0.5 * onehot
    loss_map = -(s * torch.log_softmax(pred, dim=1)).sum(1)
    ent = -(q * torch.log(q + 1e-12)).sum(1) * (t != ignore)
    classes = [int(k) for k in t.unique() if int(k) != ignore]
    total = pred.new_zeros(())
    for k in classes:
        m = (t == k).to(pred.dtype)
        total = total + (m * ent * loss_map).sum() / ((m * ent).sum() + 1e-12)
    return total / (len(classes) + 1e-12)
