"""A small UPerNet/FPN-style segmenter for end-to-end (``--model``) benchmarks.

Backbone: four stride-2 stages (stride 4, 8, 16, 32) of conv-BN-ReLU. Decoder: FPN laterals (1×1), top-down
sum, 3×3 FPN convs, all levels upsampled to stride 4 and concatenated (the ``4C``-channel map that dominates
UPerNet's memory), a 3×3 ``fpn_bottleneck`` to ``C`` channels, dropout, and the 1×1 classifier
``cls_seg`` — the layer adaptive heads replace. The output is upsampled to the input size.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class MiniUPerNet(nn.Module):
    def __init__(self, num_classes: int, channels: int = 512, widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        stem = nn.Sequential(_cbr(3, widths[0], 3, 2), _cbr(widths[0], widths[0], 3, 2))  # stride 4
        self.stages = nn.ModuleList([stem, *(_cbr(a, b, 3, 2) for a, b in itertools.pairwise(widths))])
        self.lateral = nn.ModuleList(_cbr(w, channels, 1) for w in widths)
        self.fpn = nn.ModuleList(_cbr(channels, channels) for _ in widths)
        self.fpn_bottleneck = _cbr(len(widths) * channels, channels)
        self.dropout = nn.Dropout2d(0.1)
        self.cls_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        lat = [lat(f) for lat, f in zip(self.lateral, feats, strict=False)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear")
        outs = [conv(t) for conv, t in zip(self.fpn, lat, strict=False)]
        outs = [outs[0]] + [F.interpolate(o, size=outs[0].shape[-2:], mode="bilinear") for o in outs[1:]]
        feat = self.fpn_bottleneck(torch.cat(outs, dim=1))
        logits = self.cls_seg(self.dropout(feat))
        return F.interpolate(logits, size=size, mode="bilinear")
