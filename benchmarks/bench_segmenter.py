"""A real segmenter with each adaptive head against its conv: torchvision's ``deeplabv3_resnet50`` (weights none).

For every input size, precision and head (the model as built, its 1×1 classifier and ``F.cross_entropy``, against
the model with that classifier replaced by each head and trained inside ``supervise``), it measures

- inference: ``model.eval()``, no gradients, time and peak memory;
- a whole training step: forward, ``F.cross_entropy(logits) + sup.loss()`` (every extra term of the head), backward
  and an optimizer step (SGD with momentum, the same for every row), time and peak memory;
- the work a step launches: aten ops of a float32 step counted on the meta device (forward, the head's loss,
  backward; the optimizer and the views excluded), and on CUDA the kernels the profiler records (the whole step,
  optimizer included; inference).

Precisions: ``fp32``, and ``bf16`` (the same float32 model under ``torch.autocast``). Times are medians over rounds
that run every row once (a drift of the machine spreads over every head). Peak memory: CUDA
``max_memory_allocated``; CPU the peak of live tensor bytes (``benchmarks/measure.py``).

    python benchmarks/bench_segmenter.py --device cuda                       # 512 and 1024 px, fp32 and bf16
    python benchmarks/bench_segmenter.py --sizes 256 384 --steps 2           # on a CPU (~10 min on 2 cores)
    python benchmarks/bench_segmenter.py --ops-only --sizes 512 1024         # the op counts alone (seconds)

Needs torchvision (``pip install -e ".[torchvision]" "torch==$TORCH"``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import adaptive_heads as ah  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    CPU_MEMORY_METHOD,
    count_aten_ops,
    count_cuda_kernels,
    interleaved_median_times,
    machine,
    memory_mode,
    peak_memory,
)

HEADS = ["conv", *ah.HEADS]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORE_INDEX = 255


def build(name: str, classes: int, device: torch.device | str) -> torch.nn.Module:
    """``deeplabv3_resnet50`` (no weights, no auxiliary head) with its classifier replaced by head ``name``."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)  # the same backbone and decoder for every head
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=classes, aux_loss=False)
    if name != "conv":
        ah.replace_classifier(model, name)
    return model.to(device)


def inputs(batch: int, size: int, classes: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images ``[B, 3, size, size]`` and labels ``[B, size, size]`` (the top sixteenth ignored)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, classes, (batch, size, size), generator=gen)
    target[:, : size // 16] = IGNORE_INDEX
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images.to(device), target.to(device)


def loss_of(model: torch.nn.Module, name: str, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: the model's CE, plus every extra term of its adaptive head."""
    with ah.supervise(model, target) if name != "conv" else contextlib.nullcontext() as sup:
        logits = model(images)["out"]
        loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)
        return loss if sup is None else loss + sup.loss()


def runners(name: str, args, images, target, dtype: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(infer, train_step)`` of one model."""
    model = build(name, args.classes, images.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = AUTOCAST[dtype]

    def amp():
        return torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None)

    def infer():
        model.eval()
        with torch.no_grad(), amp():
            return model(images)["out"]

    def train():
        model.train()
        with amp():
            loss = loss_of(model, name, images, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer, train


def meta_ops(name: str, args, size: int) -> dict[str, int]:
    """aten ops of inference and of a float32 training step's forward, loss and backward, on the meta device (each
    op is at least one kernel launch on CUDA; the count needs no GPU)."""
    model = build(name, args.classes, "meta")
    images, target = inputs(args.batch, size, args.classes, "meta")
    model.eval()
    with torch.no_grad():
        infer = count_aten_ops(lambda: model(images))
    model.train()
    train = count_aten_ops(lambda: loss_of(model, name, images, target).backward())
    return {"infer_ops": infer, "train_ops": train}


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    rows: list[dict] = []
    for size in args.sizes:
        for dtype in args.dtype:
            cfg = {"size": size, "batch": args.batch, "n": args.classes, "dtype": dtype}
            names = ["conv", *args.heads]
            group = [{**cfg, "head": name} for name in names]
            if not args.ops_only:
                images, target = inputs(args.batch, size, args.classes, device)
                with memory_mode():
                    for row in group:
                        infer, train = runners(row["head"], args, images, target, dtype)
                        infer(), train()  # warm-up: lazy initialisations, cuDNN's algorithm search
                        row["infer_peak_bytes"] = peak_memory(infer, device)
                        train()
                        row["train_peak_bytes"] = peak_memory(train, device)
                        if device.type == "cuda":
                            row["train_kernels"] = count_cuda_kernels(train)
                            row["infer_kernels"] = count_cuda_kernels(infer)
                        del infer, train
                steps = {row["head"]: runners(row["head"], args, images, target, dtype) for row in group}
                infer_s = interleaved_median_times({h: r[0] for h, r in steps.items()}, device, 1, args.repeats)
                train_s = interleaved_median_times({h: r[1] for h, r in steps.items()}, device, 1, args.steps)
                for row in group:
                    row["infer_s"], row["train_s"] = infer_s[row["head"]], train_s[row["head"]]
                del steps
            if dtype == "fp32":
                for row in group:
                    row.update(meta_ops(row["head"], args, size))
            report.add_relative(group, ("infer", "train"))
            rows += group
            print(f"{size} px {dtype} done", file=sys.stderr, flush=True)
    return rows


def describe(data: dict) -> str:
    m = data["machine"]
    measured = "aten ops on the meta device only" if data["ops_only"] else f"memory: {data['memory']}"
    return (
        f"{m['device']}, {m['threads']} threads, torch {m['torch']}, torchvision deeplabv3_resnet50 (weights none), "
        f"n = {data['rows'][0]['n']}, batch {data['rows'][0]['batch']}; training step = forward, "
        "`F.cross_entropy` + `sup.loss()`, backward, SGD step; ops: aten ops of forward, loss and backward on the meta "
        f"device (views excluded); {measured}"
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="input sizes in px (default 512 1024)")
    p.add_argument("--heads", nargs="+", default=list(ah.HEADS), choices=list(ah.HEADS), help="heads (default all)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(AUTOCAST), help="precisions")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--classes", type=int, default=150, help="classes n (default 150)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per head (median; default 5)")
    p.add_argument("--repeats", type=int, default=10, help="timed inference calls per head (median; default 10)")
    p.add_argument("--ops-only", action="store_true", help="count the aten ops on the meta device, measure nothing")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--memory-budget-mib", type=int,
        help="adaptive_heads.set_memory_budget for the device (default: the device's own; e.g. 8192 on a CPU to "
        "run the one-pass code a GPU runs)",
    )  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/<device>-segmenter.json)")
    p.add_argument("--update-readme", action="store_true", help="replace the bench:<stem> block of the docs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_budget_mib:
        ah.set_memory_budget(args.memory_budget_mib << 20, device.type)
    rows = measure(args)
    data = {
        "machine": machine(device),
        "memory": CPU_MEMORY_METHOD if device.type == "cpu" else "torch.cuda.max_memory_allocated",
        "memory_budget_mib": ah.memory_budget(device) >> 20,
        "ops_only": args.ops_only,
        "commit": report.git_commit(),
        "args": [a for a in (sys.argv[1:] if argv is None else argv) if a != "--update-readme"],
        "rows": rows,
    }
    stem = f"{device.type}-segmenter"
    out = args.out or ROOT / "benchmarks" / "results" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    text = report.segmenter_block(data)
    print(f"{text}\n\nwrote {out}")
    if args.update_readme:
        report.update_block(f"bench:{out.stem}", text)
    return data


if __name__ == "__main__":
    main()
