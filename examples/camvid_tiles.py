"""CamVid with tiles and without context: what the image context does to CAC and SSA-Seg at inference.

Loads the checkpoints of a ``train_camvid.py`` run and evaluates the val split four ways: whole frames; whole
frames with the head's static classifier only (the coarse prediction ``conv_seg(feat)``: the same trained network,
no per-image adaptation, which separates the gain of the adaptation at inference from the gain of the training
signal); tiles with a classifier per tile (``context="tile"``, mmseg's slide inference) and tiles with the
classifier built from the whole frame (``context="image"``: from the tiles' cores, the default, and from every tile
pixel, ``context_margin=0``). The tiles are half the frame in each direction with a third of overlap (mmseg's
512-crop / 341-stride proportions): 90×120 crops with stride 60×80 on the default 180×240 frames.

    python examples/camvid_tiles.py --data path/to/CamVid              # after the default train_camvid.py run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from camvid_data import EvalDataset, channel_statistics, load_split  # noqa: E402
from train_camvid import build_model, confusion_matrix, parse_args, scores  # noqa: E402

import adaptive_heads as ah  # noqa: E402
from adaptive_heads.cosine_head import CosineHead  # noqa: E402

MODES = ("whole", "static", "tile", "image", "image_all")


@contextmanager
def static_classifier(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every adaptive head of ``model`` returns its coarse logits (the static classifier) at inference."""
    heads = [m for m in model.modules() if isinstance(m, CosineHead)]
    for head in heads:
        head.forward_logits = head.coarse_logits  # type: ignore[method-assign]
    try:
        yield
    finally:
        for head in heads:
            del head.forward_logits


def static_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with static_classifier(model):
        return model(images)


@torch.no_grad()
def evaluate_modes(model, split, stats, args, crop, stride) -> dict[str, float]:
    """val mIoU (percent) of whole-frame inference with the adaptive and the static classifier, and of slide
    inference in tile and image context."""
    model.eval()
    loader = DataLoader(EvalDataset(split, *stats, scale=args.scale), batch_size=args.eval_batch)
    conf = {mode: 0 for mode in MODES}
    for images, labels, _ in loader:
        outputs = {
            "whole": model(images),
            "static": static_logits(model, images),
            "tile": ah.slide_inference(model, images, crop, stride, context="tile"),
            "image": ah.slide_inference(model, images, crop, stride, context="image"),
            "image_all": ah.slide_inference(model, images, crop, stride, context="image", context_margin=0),
        }
        for mode, logits in outputs.items():
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            for p, t in zip(logits.argmax(1), labels, strict=True):
                conf[mode] = conf[mode] + confusion_matrix(p, t)
    return {mode: scores(c)["miou"] for mode, c in conf.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--run", type=Path, default=ROOT / "examples" / "results" / "camvid.json", help="the run's JSON")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "runs" / "camvid")
    p.add_argument("--classifiers", nargs="+", default=["cac", "ssa"])
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "results" / "camvid-tiles.json")
    cli = p.parse_args(argv)
    run = json.loads(cli.run.read_text())
    cfg = run["config"]
    args = parse_args(["--data", str(cli.data)])  # the training script's defaults, then the run's own settings
    for key in ("scale", "widths", "depths", "channels", "decoder", "class_direction", "timm_encoder", "eval_batch"):
        if key in cfg:
            setattr(args, key, cfg[key])
    train = load_split(cli.data, "train")
    stats = channel_statistics(train.images)
    val = load_split(cli.data, "val")
    h, w = (round(side * args.scale) for side in val.labels.shape[1:])
    crop, stride = (h // 2, w // 2), (h // 3, w // 3)
    rows = []
    for r in run["runs"]:
        if r["classifier"] not in cli.classifiers:
            continue
        model = build_model(r["classifier"], args, r["seed"])
        state = torch.load(cli.checkpoints / r["checkpoint"], map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        miou = evaluate_modes(model, val, stats, args, crop, stride)
        rows.append({"classifier": r["classifier"], "seed": r["seed"], **miou})
        print(rows[-1], file=sys.stderr)
    lines = [
        "| classifier | whole frame | static classifier only | whole − static | tiles, tile context "
        "| tiles, image context | image − tile | tiles, image context from every tile pixel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in cli.classifiers:
        rs = [r for r in rows if r["classifier"] == name]
        if not rs:
            continue
        cell = {m: statistics.mean(r[m] for r in rs) for m in MODES}
        adapt = statistics.mean(r["whole"] - r["static"] for r in rs)
        gain = statistics.mean(r["image"] - r["tile"] for r in rs)
        lines.append(
            f"| {name} | {cell['whole']:.1f} | {cell['static']:.1f} | {adapt:+.1f} | {cell['tile']:.1f} "
            f"| {cell['image']:.1f} | {gain:+.1f} | {cell['image_all']:.1f} |"
        )
    table = "\n".join(lines)
    print(f"val mIoU, {h}×{w} frames, crops {crop[0]}×{crop[1]}, stride {stride[0]}×{stride[1]}:\n\n{table}")
    cli.out.write_text(json.dumps({"crop": crop, "stride": stride, "rows": rows, "table": table}, indent=1) + "\n")
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()
