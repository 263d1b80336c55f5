"""Train a tiny segmentation model a few steps with each adaptive head; print losses and logit shapes.

    python examples/demo.py [--steps 20] [--device cpu]

The model is torchvision-shaped (``backbone`` → ``classifier`` Sequential ending in a 1×1 conv) and the
data are synthetic blobs, so this runs anywhere in seconds. Each head is swapped in with
``replace_classifier`` and trained through ``supervise`` — the model's own forward is untouched.

What it shows: the mechanics (the swap, the labels' side channel, every loss term of each head and its scale,
the shapes at inference). What it does not show: accuracy. A few steps on 4 synthetic images per batch measure
nothing about segmentation quality (the plain conv often ends ahead here); for that see the CamVid experiment
(docs/camvid.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import adaptive_heads as ah


def make_model(num_classes: int, width: int = 32) -> nn.Module:
    class FCN(nn.Module):  # torchvision's FCN layout; replace_classifier finds the one conv with num_classes outputs
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = num_classes
            self.backbone = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            )  # fmt: skip
            self.classifier = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.1),
                nn.Conv2d(width, num_classes, 1),
            )  # fmt: skip

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.classifier(self.backbone(x))
            return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}

    return FCN()


def make_batch(batch: int, num_classes: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random rectangles of random classes whose colour varies per image (the intra-class shift)."""
    images = torch.rand(batch, 3, size, size, generator=generator) * 0.2
    target = torch.zeros(batch, size, size, dtype=torch.long)
    palette = torch.rand(num_classes, 3, generator=generator)
    for b in range(batch):
        shift = torch.rand(3, generator=generator) * 0.4 - 0.2
        for _ in range(3):
            k = int(torch.randint(1, num_classes, (1,), generator=generator))
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
            h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=generator))
            target[b, y0 : y0 + h, x0 : x0 + w] = k
            images[b, :, y0 : y0 + h, x0 : x0 + w] = (palette[k] + shift).clamp(0, 1)[:, None, None]
    target[:, :2] = 255  # an ignored border, as padded crops have
    return images, target


NOTE = (
    "This demo shows the mechanics and the loss terms, not accuracy: a few steps on synthetic images measure\n"
    "nothing about segmentation quality (the CamVid experiment in docs/camvid.md does).\n"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps per head (default 20)")
    parser.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--size", type=int, default=64, help="image size (default 64)")
    parser.add_argument("--classes", type=int, default=6, help="number of classes (default 6)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args()
    print(NOTE)

    for name, head_cls in {"Conv2d (baseline)": None, **{c.__name__: c for c in ah.HEADS.values()}}.items():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = make_model(args.classes)
        if head_cls is not None:
            # the dropout before the classifier feeds it alone: CAC and SSA-Seg apply it to their coarse path
            ah.replace_classifier(model, head_cls, absorb_dropout="classifier.3")
        model.to(args.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        start = time.perf_counter()
        for step in range(args.steps):
            images, target = (t.to(args.device) for t in make_batch(args.batch, args.classes, args.size, gen))
            if head_cls is None:
                logits = model(images)["out"]
                loss = F.cross_entropy(logits, target, ignore_index=255)
                terms = {}
            else:
                with ah.supervise(model, target) as sup:
                    logits = model(images)["out"]
                    main_ce = F.cross_entropy(logits, target, ignore_index=255)
                    terms = sup.losses()
                    loss = main_ce + terms["adaptive_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in (0, args.steps - 1):
                extra = ", ".join(f"{k.split('.')[-1]}={v.item():.3f}" for k, v in terms.items() if k != "loss")
                print(f"[{name}] step {step:3d}  loss={loss.item():.3f}  {extra}")
        model.eval()
        with torch.no_grad():
            images, target = (t.to(args.device) for t in make_batch(args.batch, args.classes, args.size, gen))
            head_logits = model.classifier[4](model.classifier[:4](model.backbone(images)))
            pred = model(images)["out"].argmax(1)
        acc = (pred == target)[target != 255].float().mean().item()
        print(
            f"[{name}] head logits {tuple(head_logits.shape)}, model output {tuple(pred.shape)}, "
            f"pixel acc {acc:.3f}, {time.perf_counter() - start:.1f}s\n"
        )


if __name__ == "__main__":
    main()
