"""Fashion scenes: a small real training run comparing the plain 1×1 classifier with each adaptive head.

Data: Fashion-MNIST product photos (Debian package ``dataset-fashion-mnist``: ``apt-get install
dataset-fashion-mnist``) composited into 64×64 scenes of 2–4 items on a noisy background, 11 classes
(background + 10 products). Every image gets its own colour cast and contrast, and every item its own tint: the
intra-class, image-specific appearance variation adaptive classifiers target.

Model: a small FCN (output stride 4, 64-channel decoder) with a ``nn.Conv2d(64, 11, 1)`` classifier; each head
replaces that conv through ``replace_classifier`` and trains through ``supervise``. Same data, seeds, optimiser
and epochs for every model. Reports val mIoU (mean ± std over seeds), per-class IoU, time per epoch; writes
``examples/results/scenes.json``, a Markdown table, ``scenes_miou.png`` (curves) and ``scenes_predictions.png``.

    python examples/train_scenes.py                    # the README run (~15 min on 2 CPU cores)
    python examples/train_scenes.py --quick            # seconds (tiny data, 1 epoch)
    python examples/train_scenes.py --synthetic        # no dataset needed (random glyphs instead of photos)
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import adaptive_heads as ah  # noqa: E402

CLASSES = ["background", "T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
HEADS = {
    "conv": None,
    "cac": ah.ContextAwareClassifier,
    "ssa": ah.SSAClassifier,
    "proto": ah.PrototypeClassifier,
}
DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- data
def load_items(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST IDX files → ``[N, 28, 28]`` uint8 images and ``[N]`` labels."""
    prefix = "train" if split == "train" else "t10k"
    images_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise SystemExit(
            f"{images_path} not found: install the data with `apt-get install dataset-fashion-mnist`, "
            "pass --data-dir, or run with --synthetic"
        )
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(data_dir / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def synthetic_items(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random class-specific glyphs, for running without the dataset."""
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((n, 28, 28), np.uint8)
    for i, k in enumerate(labels):
        shape = (np.abs(yy - 14) < 4 + k) & (np.abs(xx - 14) < 12 - k // 2) | ((yy + xx + k) % (k + 3) == 0)
        images[i] = (shape * rng.uniform(150, 255)).astype(np.uint8)
    return images, labels


def make_scenes(items, item_labels, count, size, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` scenes ``[count, 3, size, size]`` in [0, 1] and labels ``[count, size, size]`` (0 = background)."""
    palette = rng.uniform(0.25, 1.0, (10, 3))
    images = np.zeros((count, 3, size, size), np.float32)
    labels = np.zeros((count, size, size), np.int64)
    for s in range(count):
        bg = rng.uniform(0.0, 0.35, 3)
        img = bg[:, None, None] + rng.normal(0, 0.05, (3, size, size))
        lab = np.zeros((size, size), np.int64)
        cast, contrast = rng.uniform(-0.25, 0.25, 3), rng.uniform(0.6, 1.3)  # per-image appearance shift
        for _ in range(rng.integers(2, 5)):
            idx = rng.integers(len(items))
            scale = rng.uniform(0.9, 1.6)
            side = int(28 * scale)
            glyph = torch.from_numpy(items[idx].astype(np.float32) / 255.0)[None, None]
            glyph = F.interpolate(glyph, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
            y0, x0 = rng.integers(0, size - side + 1, 2) if side < size else (0, 0)
            glyph = glyph[: size - y0, : size - x0]
            mask = glyph > 0.2
            k = int(item_labels[idx])
            tint = np.clip((palette[k] + rng.normal(0, 0.08, 3)) * contrast + cast, 0, 1)  # per-item tint
            region = img[:, y0 : y0 + glyph.shape[0], x0 : x0 + glyph.shape[1]]
            region[:, mask] = tint[:, None] * (0.35 + 0.65 * glyph[mask])
            lab[y0 : y0 + glyph.shape[0], x0 : x0 + glyph.shape[1]][mask] = k + 1
        images[s], labels[s] = np.clip(img, 0, 1), lab
    return torch.from_numpy(images), torch.from_numpy(labels)


# ----------------------------------------------------------------------------- model
class FCN(nn.Module):
    """Small FCN, output stride 4; ``classifier[-1]`` is the 1×1 classifier conv."""

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()

        def cbr(cin, cout, stride=1, dilation=1):
            return [nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.backbone = nn.Sequential(
            *cbr(3, 32, 2), *cbr(32, width, 2), *cbr(width, width), *cbr(width, width, dilation=2),
            *cbr(width, width, dilation=4), *cbr(width, width),
        )  # fmt: skip
        self.classifier = nn.Sequential(*cbr(width, width), nn.Dropout(0.1), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear")


# ----------------------------------------------------------------------------- train / eval
def confusion(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(target.flatten() * n + pred.flatten(), minlength=n * n).view(n, n)


def iou_from(conf: torch.Tensor) -> torch.Tensor:
    tp = conf.diag().double()
    return tp / (conf.sum(0) + conf.sum(1) - conf.diag()).double().clamp_min(1)


def evaluate(model, images, labels, batch) -> torch.Tensor:
    model.eval()
    conf = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            conf += confusion(model(images[i : i + batch]).argmax(1), labels[i : i + batch], len(CLASSES))
    return iou_from(conf)


def train_one(name, data, args, seed, progress) -> dict:
    train_x, train_y, val_x, val_y = data
    torch.manual_seed(seed)
    model = FCN(len(CLASSES), args.width)
    if HEADS[name] is not None:
        ah.replace_classifier(model, HEADS[name])
    head_params = [p for n, p in model.named_parameters() if n.startswith("classifier.4")]
    other = [p for n, p in model.named_parameters() if not n.startswith("classifier.4")]
    optimizer = torch.optim.AdamW(
        [{"params": other}, {"params": head_params, "lr": args.lr * args.head_lr_mult}], lr=args.lr, weight_decay=1e-4
    )
    steps = args.epochs * ((len(train_x) + args.batch - 1) // args.batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[args.lr, args.lr * args.head_lr_mult], total_steps=steps, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(seed)
    curve, epoch_times = [], []
    for _ in range(args.epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            x, y = train_x[idx], train_y[idx]
            if HEADS[name] is None:
                loss = F.cross_entropy(model(x), y)
            else:
                with ah.supervise(model, y) as sup:
                    loss = F.cross_entropy(model(x), y) + sup.loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update(1)
        epoch_times.append(time.perf_counter() - start)
        curve.append(evaluate(model, val_x, val_y, 256).mean().item())
    ious = evaluate(model, val_x, val_y, 256)
    return {"model": model, "curve": curve, "iou": ious.tolist(), "miou": ious.mean().item(), "epoch_s": epoch_times}


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr)
            except ImportError:
                self.total, self.done = total, 0

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)
        elif hasattr(self, "done"):
            self.done += n
            if self.done % max(1, self.total // 20) == 0:
                print(f"  {100 * self.done // self.total}%", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- reporting
def report(results: dict, args) -> str:
    lines = [
        "| classifier | val mIoU (mean ± std over seeds) | s / epoch |",
        "|---|---|---|",
    ]
    for name, runs in results.items():
        mious = [r["miou"] for r in runs]
        std = statistics.stdev(mious) if len(mious) > 1 else 0.0
        epoch = statistics.mean(t for r in runs for t in r["epoch_s"])
        lines.append(f"| {name} | {100 * statistics.mean(mious):.1f} ± {100 * std:.1f} | {epoch:.1f} |")
    lines += ["", "| class | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for c, cls in enumerate(CLASSES):
        cells = [f"{100 * statistics.mean(r['iou'][c] for r in runs):.1f}" for runs in results.values()]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(results: dict, models: dict, val_x, val_y, out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no pictures")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        curves = np.array([r["curve"] for r in runs]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker="o", label=name)
        ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="val mIoU (%)", title="Fashion scenes: validation mIoU (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "scenes_miou.png", dpi=110)
    plt.close(fig)

    cmap = plt.get_cmap("tab20", len(CLASSES))
    rows = 4
    fig, axes = plt.subplots(rows, 2 + len(models), figsize=(2 * (2 + len(models)), 2 * rows))
    with torch.no_grad():
        preds = {name: m.eval()(val_x[:rows]).argmax(1) for name, m in models.items()}
    for r in range(rows):
        panels = [("image", val_x[r].permute(1, 2, 0).numpy(), None), ("ground truth", val_y[r].numpy(), cmap)]
        panels += [(name, preds[name][r].numpy(), cmap) for name in models]
        for c, (title, img, cm) in enumerate(panels):
            axes[r, c].imshow(img, cmap=cm, vmin=0 if cm else None, vmax=len(CLASSES) - 1 if cm else None)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "scenes_predictions.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA, help=f"Fashion-MNIST IDX files (default {DEFAULT_DATA})"
    )
    p.add_argument("--synthetic", action="store_true", help="random glyphs instead of Fashion-MNIST")
    p.add_argument("--train", type=int, default=3000, help="training scenes (default 3000)")
    p.add_argument("--val", type=int, default=800, help="validation scenes (default 800)")
    p.add_argument("--size", type=int, default=64, help="scene size (default 64)")
    p.add_argument("--epochs", type=int, default=6, help="epochs (default 6)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW max learning rate, one-cycle (default 3e-3)")
    p.add_argument("--head-lr-mult", type=float, default=1.0, help="learning-rate multiplier of the classifier")
    p.add_argument("--width", type=int, default=64, help="decoder channels C (default 64)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS), help="models to train")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "results", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny run for a smoke test")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.val, args.epochs, args.seeds, args.width = 64, 32, 1, [0], 16
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(1234)
    if args.synthetic:
        train_items, train_labels = synthetic_items(2000, rng)
        val_items, val_labels = synthetic_items(500, rng)
    else:
        train_items, train_labels = load_items(args.data_dir, "train")
        val_items, val_labels = load_items(args.data_dir, "test")
    train_x, train_y = make_scenes(train_items, train_labels, args.train, args.size, rng)
    val_x, val_y = make_scenes(val_items, val_labels, args.val, args.size, rng)
    data = (train_x, train_y, val_x, val_y)

    steps = len(args.heads) * len(args.seeds) * args.epochs * ((args.train + args.batch - 1) // args.batch)
    progress = _Progress(steps, not args.no_progress)
    results, last_models = {}, {}
    for name in args.heads:
        results[name] = []
        for seed in args.seeds:
            run = train_one(name, data, args, seed, progress)
            last_models[name] = run.pop("model")
            results[name].append(run)
    table = report(results, args)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "scenes-quick" if args.quick else "scenes"
    (args.out / f"{tag}.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "classes": CLASSES, "results": results}, indent=1
        )
    )
    (args.out / f"{tag}.md").write_text(table + "\n")
    if not args.quick:
        plots(results, last_models, val_x, val_y, args.out)
    return results


if __name__ == "__main__":
    main()
