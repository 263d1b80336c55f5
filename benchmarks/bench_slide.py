"""Peak memory and time of sliding-window inference with image context against whole-image inference.

A whole segmenter (``benchmarks/decoder.py``'s MiniUPerNet, the 4C-channel concat of UPerNet) with an adaptive
head classifies one large image three ways: the whole image at once, mmseg-style slide inference with a
classifier per tile (``context="tile"``), and slide inference with the classifier built from the whole image
(``context="image"``: two passes of the model over the tiles). Memory as in ``bench_heads.py``
(CPU: peak resident set with glibc returning freed blocks at once; CUDA: ``max_memory_allocated``).

    python benchmarks/bench_slide.py                      # 2048×2048, crop 512, stride 341, CAC, C = 256, n = 19
    python benchmarks/bench_slide.py --size 1024 --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import adaptive_heads as ah  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.decoder import MiniUPerNet  # noqa: E402
from benchmarks.measure import CPU_MEMORY_METHOD, memory_mode, peak_memory  # noqa: E402


def measure(args) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MiniUPerNet(args.classes, channels=args.channels, widths=tuple(args.widths)).to(device)
    ah.replace_classifier(model, ah.HEADS[args.head], num_classes=args.classes)
    model.eval()
    images = torch.randn(1, 3, args.size, args.size, device=device)
    modes = {
        "whole image": lambda: model(images),
        "slide, tile context": lambda: ah.slide_inference(model, images, args.crop, args.stride, context="tile"),
        "slide, image context": lambda: ah.slide_inference(model, images, args.crop, args.stride, context="image"),
    }
    rows = []
    with torch.no_grad():
        for name, fn in modes.items():
            fn()  # warm-up
            with memory_mode():
                peak = peak_memory(fn, device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows.append({"mode": name, "seconds": time.perf_counter() - start, "peak_bytes": peak})
    tiles = len(ah.slide.tile_grid(args.size, args.size, (args.crop, args.crop), (args.stride, args.stride)))
    for row in rows:
        row["tiles"] = 1 if row["mode"] == "whole image" else tiles
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--stride", type=int, default=341)
    p.add_argument("--head", default="cac", choices=list(ah.HEADS))
    p.add_argument("--channels", type=int, default=256, help="decoder channels C")
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--widths", type=int, nargs=4, default=[64, 128, 256, 512])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    p.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/<device>-slide.json)")
    p.add_argument("--update-readme", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.channels, args.widths = 16, [8, 8, 16, 16]
    rows = measure(args)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    meta = (
        f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, MiniUPerNet C = {args.channels}, "
        f"n = {args.classes}, {args.head}, one {args.size}×{args.size} image, crop {args.crop}, stride "
        f"{args.stride}; memory: {CPU_MEMORY_METHOD if args.device == 'cpu' else 'torch.cuda.max_memory_allocated'}"
    )
    text = report.slide_table(rows)
    print(meta + "\n\n" + text)
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"{args.device.split(':')[0]}-slide{'-quick' if args.quick else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"meta": meta, "commit": report.git_commit(), "args": sys.argv[1:] if argv is None else argv, "rows": rows},
            indent=1,
        )
    )
    if args.update_readme:
        report.update_block(f"bench:{out.stem}", report.bench_block(out.stem))
    return rows


if __name__ == "__main__":
    main()
