"""Why does an adaptive head gain less on an unseen sequence than on ``val``? Measurements from trained runs.

For every run of a ``train_camvid.py`` result (its checkpoints), on each evaluated split (``val``: frames of a
training sequence; ``unseen``: the held-out sequence), whole frames as in ``train_camvid.evaluate``:

- ``miou`` and ``coarse_miou``: the head's prediction and its coarse prediction (``conv_seg`` of the same
  features, the prediction the prototypes are pooled with), both against the labels;
- ``confidence``: the coarse prediction's mean max-softmax over labelled pixels (how peaked the pooling weights
  are);
- ``purity`` per class: of the pooling mass ``Σ_i w_c(i)`` over the split's labelled pixels, the share that comes
  from pixels labelled c (1: class c's semantic prototype is pooled from its own class only); ``w`` is the head's
  own pooling weight (``CosineHead.context_weights``: the softmax officially, see ``context_pooling``). Summed
  over the split (the heads normalise per image), labelled pixels only (the heads also pool unlabelled ones),
  and the semantic centre only (SSA-Seg's spatial centre pools with a softmax over pixels instead);
- ``class_share``: each class's share of the labelled pixels of the split (the class mix).

    python examples/camvid_diagnose.py --data path/to/CamVid --run examples/results/camvid-unseen.json

Writes ``<run>-diagnosis.json`` beside the result and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from camvid_data import CLASSES, IGNORE_INDEX, CamVidSplit, EvalDataset, channel_statistics  # noqa: E402
from train_camvid import (  # noqa: E402
    CLASSIFIER_PATH,
    build_model,
    confusion_matrix,
    context_pooling_of,
    load_data,
    parse_args,
    scores,
)

from adaptive_heads.cosine_head import CosineHead  # noqa: E402
from adaptive_heads.functional import resize_labels_nearest  # noqa: E402

N = len(CLASSES)


def load_weights(model: nn.Module, state: dict) -> None:
    """A checkpoint's weights; one saved before the heads stored their options has no ``_extra_state``."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.endswith("_extra_state") for key in missing):
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


def _upsampled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def diagnose(model: nn.Module, split: CamVidSplit, stats, scale: float) -> dict:
    """The measurements above for one model on one split."""
    head = model.get_submodule(CLASSIFIER_PATH)
    features: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    model.eval()
    final, coarse_conf = torch.zeros(N, N, dtype=torch.long), torch.zeros(N, N, dtype=torch.long)
    mass = torch.zeros(N, N, dtype=torch.float64)  # [class c, label k]: Σ of c's pooling weight over pixels labelled k
    confidence, counted = 0.0, 0
    for images, labels, _ in DataLoader(EvalDataset(split, *stats, scale=scale), batch_size=4):
        features.clear()
        logits = model(images)
        coarse = head.coarse_logits(features[0]) if isinstance(head, CosineHead) else logits
        final += confusion_matrix(_upsampled(logits, labels).argmax(1), labels)
        coarse_conf += confusion_matrix(_upsampled(coarse, labels).argmax(1), labels)
        small = resize_labels_nearest(labels, coarse.shape[-2:])  # the labels at the pooling's resolution
        probs = coarse.float().softmax(1)
        weights = head.context_weights(coarse) if isinstance(head, CosineHead) else probs  # the head's own pooling
        keep = small != IGNORE_INDEX
        flat_probs = probs.permute(0, 2, 3, 1)[keep].double()  # [M, n]
        one_hot = F.one_hot(small[keep], N).double()  # [M, n]
        mass += weights.permute(0, 2, 3, 1)[keep].double().T @ one_hot
        confidence += float(flat_probs.max(1).values.sum())
        counted += int(keep.sum())
    hook.remove()
    purity = mass.diagonal() / mass.sum(1).clamp_min(1e-12)
    shares = coarse_conf.sum(1).double() / coarse_conf.sum()
    return {
        "miou": scores(final)["miou"],
        "coarse_miou": scores(coarse_conf)["miou"],
        "coarse_per_class_iou": scores(coarse_conf)["per_class_iou"],
        "confidence": confidence / max(counted, 1),
        "purity": dict(zip(CLASSES, purity.tolist(), strict=True)),
        "class_share": dict(zip(CLASSES, shares.tolist(), strict=True)),
    }


def main(argv: list[str] | None = None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--data", type=Path, required=True)
    cli.add_argument("--run", type=Path, required=True, help="a train_camvid.py result JSON")
    cli.add_argument("--checkpoints", type=Path, default=ROOT / "runs" / "camvid")
    cli.add_argument("--classifiers", nargs="+", default=["cac", "ssa"],
                     help="default: the heads that pool with a coarse prediction (for conv and cosine the "
                     "'coarse' prediction is the prediction itself)")  # fmt: skip
    cli.add_argument("--threads", type=int)
    opts = cli.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    run = json.loads(opts.run.read_text())
    cfg = run["config"]
    args = parse_args(["--data", str(opts.data), *cfg.get("argv", [])])
    args.checkpoints = opts.checkpoints
    data = load_data(args)
    stats = channel_statistics(data["train"].images)
    rows = []
    for record in run["runs"]:
        if record["classifier"] not in opts.classifiers:
            continue
        model = build_model(record["classifier"], args, record["seed"])
        load_weights(model, torch.load(opts.checkpoints / record["checkpoint"], weights_only=False)["model"])
        for split in (s for s in ("val", "unseen", "test") if s in data):
            rows.append({"classifier": record["classifier"], "seed": record["seed"], "split": split,
                         **diagnose(model, data[split], stats, args.scale)})  # fmt: skip
            row = rows[-1]
            print(f"{row['classifier']} s{row['seed']} {split}: mIoU {row['miou']:.1f}, "
                  f"coarse {row['coarse_miou']:.1f}, confidence {row['confidence']:.3f}", file=sys.stderr)  # fmt: skip
    out = opts.run.with_name(opts.run.stem + "-diagnosis.json")
    result = {"run": opts.run.name, "context_pooling": context_pooling_of(cfg), "classes": CLASSES, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(rows))
    return result


def summary(rows: list[dict]) -> str:
    """Markdown: per classifier and split, the means over seeds."""
    lines = ["| classifier | split | mIoU | coarse mIoU | coarse confidence | mean purity |", "|---" * 6 + "|"]
    for name, split in dict.fromkeys((r["classifier"], r["split"]) for r in rows):
        rs = [r for r in rows if (r["classifier"], r["split"]) == (name, split)]
        miou, coarse = statistics.mean(r["miou"] for r in rs), statistics.mean(r["coarse_miou"] for r in rs)
        confidence = statistics.mean(r["confidence"] for r in rs)
        purity = statistics.mean(statistics.mean(r["purity"].values()) for r in rs)
        lines.append(f"| {name} | {split} | {miou:.1f} | {coarse:.1f} | {confidence:.3f} | {purity:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
