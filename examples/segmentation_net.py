"""A real segmentation network for the CamVid example: ResNet-style encoder + FPN decoder + 1×1 classifier.

The encoder is a ResNet of basic blocks (stem, four stages at strides 4, 8, 16, 32), trained from scratch by
default; ``timm_encoder("resnet18", pretrained=True)`` swaps in a timm ResNet with ImageNet weights for users
who can download them. The decoder is the semantic FPN of Kirillov et al. (the decoder of smp's ``FPN``):
lateral 1×1 convs, a top-down pathway, one 3×3 conv per level, every level upsampled to stride 4 and summed,
then a 3×3 conv, dropout and the classifier ``nn.Conv2d(channels, num_classes, 1)`` at ``decoder.classifier``
— the conv that :func:`adaptive_heads.replace_classifier` swaps for an adaptive head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_heads.functional import cosine_logits

__all__ = ["CosineClassifier", "FPNDecoder", "ResNetEncoder", "SegmentationNet", "UNetDecoder", "timm_encoder"]


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv-BN, identity (or strided 1×1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.conv2[1].weight)  # zero-init the residual branch (Goyal et al.): trains from scratch
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet of basic blocks from scratch: ``[B, 3, H, W]`` → features at strides 4, 8, 16, 32.

    Args:
        widths: channels of the four stages (ResNet-18: 64, 128, 256, 512).
        depths: basic blocks per stage (ResNet-18: 2, 2, 2, 2).
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), depths: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, widths[0] // 2, 3, 2), conv_bn_relu(widths[0] // 2, widths[0], 3, 2))
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=False)):
            blocks = [BasicBlock(cin, width, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.channels = list(widths)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class TimmEncoder(nn.Module):
    """A timm backbone with ``features_only=True``, returning its last four feature maps."""

    def __init__(self, name: str, pretrained: bool) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(name, features_only=True, pretrained=pretrained, out_indices=(1, 2, 3, 4))
        self.channels = list(self.model.feature_info.channels())

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.model(x))


def timm_encoder(name: str = "resnet18", pretrained: bool = True) -> nn.Module:
    """An encoder from timm (``pip install timm``; comes with the ``smp`` extra), ImageNet weights by default."""
    return TimmEncoder(name, pretrained)


class FPNDecoder(nn.Module):
    """Semantic FPN: ``[f4, f8, f16, f32]`` → ``[B, channels, H/4, W/4]`` → ``classifier`` logits."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels)
        self.fuse = conv_bn_relu(channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=False)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        size = laterals[0].shape[-2:]
        merged = sum(
            F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False) if i else conv(x)
            for i, (conv, x) in enumerate(zip(self.smooth, laterals, strict=False))
        )
        return self.classifier(self.dropout(self.fuse(merged)))


class UNetDecoder(nn.Module):
    """U-Net decoder (as smp's ``Unet``): from stride 32 up to stride 4, each step upsampling ×2, concatenating the
    encoder's feature of that stride and applying two 3×3 conv-BN-ReLU; then the 3×3 classifier
    ``nn.Conv2d(channels[-1], num_classes, 3, padding=1)`` (smp's ``segmentation_head``)."""

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: Sequence[int] = (128, 64, 32), kernel: int = 3
    ) -> None:
        super().__init__()
        skips = list(in_channels[-2::-1])  # strides 16, 8, 4
        blocks, cin = [], in_channels[-1]
        for skip, cout in zip(skips, channels, strict=False):
            blocks.append(nn.Sequential(conv_bn_relu(cin + skip, cout), conv_bn_relu(cout, cout)))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(cin, num_classes, kernel, padding=kernel // 2)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, features[-2::-1], strict=False):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return self.classifier(x)


class CosineClassifier(nn.Module):
    """A static cosine classifier: ``logits = tau · cos(x, w_c)`` per pixel, ``[B, C, H, W]`` → ``[B, n, H, W]``.

    The cosine classifier of CAC and SSA-Seg (same scale ``tau``, same N(0, 0.01²) init of the class weights)
    with no per-image adaptation and trained with plain CE: the baseline that separates what the normalisation
    does from what the adaptation does.
    """

    def __init__(self, in_channels: int, num_classes: int, tau: float = 15.0, init_std: float = 0.01) -> None:
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.randn(num_classes, in_channels) * init_std)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, tau: float = 15.0) -> CosineClassifier:
        """The cosine classifier with the class directions of a trained 1×1 ``conv`` (its bias dropped)."""
        head = cls(conv.in_channels, conv.out_channels, tau)
        head.weight.data.copy_(conv.weight.detach().flatten(1))
        return head

    def forward(self, x: Tensor) -> Tensor:
        return cosine_logits(x, self.weight, self.tau)


class SegmentationNet(nn.Module):
    """Encoder + decoder (``"fpn"``, or ``"unet"`` with a 3×3 classifier); ``forward`` returns logits
    ``[B, n, H, W]`` at the input size.

    The classifier is ``decoder.classifier`` (FPN: ``nn.Conv2d(channels, num_classes, 1)``); ``num_classes`` is
    an attribute, so :func:`adaptive_heads.replace_classifier` also finds it without a path.
    """

    def __init__(
        self, num_classes: int, encoder: nn.Module | None = None, channels: int = 64, decoder: str = "fpn"
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.encoder = ResNetEncoder() if encoder is None else encoder
        if decoder == "fpn":
            self.decoder = FPNDecoder(self.encoder.channels, num_classes, channels)
        elif decoder == "unet":
            self.decoder = UNetDecoder(self.encoder.channels, num_classes, (2 * channels, channels, channels // 2))
        else:
            raise ValueError(f"decoder must be 'fpn' or 'unet', got {decoder!r}")

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decoder(self.encoder(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # a quick shape check
    net = SegmentationNet(11)
    print(net.encoder.channels, count_parameters(net), net(torch.randn(1, 3, 64, 96)).shape)
