"""Small segmentation models used by the tests (and shaped like the libraries' own)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class TinyFCN(nn.Module):
    """A torchvision-style FCN: ``backbone`` → ``classifier`` (``nn.Sequential`` ending in a 1×1 conv at index 4).

    ``forward`` passes only features to the classifier and returns ``{"out": logits at input size}``.
    """

    def __init__(self, num_classes: int = 4, width: int = 8, aux: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(width, num_classes, 1),
        )  # fmt: skip
        self.aux_classifier = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(width, num_classes, 1),
        ) if aux else None  # fmt: skip

    def forward(self, x: torch.Tensor) -> OrderedDict:
        feats = self.backbone(x)
        result = OrderedDict()
        result["out"] = F.interpolate(self.classifier(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.aux_classifier is not None:
            result["aux"] = F.interpolate(
                self.aux_classifier(feats), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
        return result


# looked up like torchvision's FCN in the known-path table (which matches the library and the class name in the MRO);
# the real torchvision models are tested in tests/integrations
TinyFCN.__name__ = TinyFCN.__qualname__ = "FCN"
TinyFCN.__module__ = "torchvision.models.segmentation.fcn"


class PlainSegmenter(nn.Module):
    """An unknown model class: the classifier must be found by the fallback rule."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.decoder = nn.ModuleDict({"fuse": nn.Conv2d(width, width, 1), "cls": nn.Conv2d(width, num_classes, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder["cls"](torch.relu(self.decoder["fuse"](torch.relu(self.stem(x)))))
