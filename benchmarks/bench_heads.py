"""Speed and memory of the adaptive heads against the plain ``nn.Conv2d(C, n, 1)`` + cross-entropy baseline.

For every configuration (input size × feature stride × classes n × channels C) and head, it measures

- inference: head-only time and frames per second, peak memory;
- training: forward + every loss term + backward, time and peak memory;

Times are medians over rounds that run every head of a configuration once (round-robin, after warm-up), so a
drift of a shared machine is spread over the heads instead of charged to one of them.

and reports each against the baseline (ratio, and extra memory in MiB and %). Results are printed as a
Markdown table, written as JSON, and drawn as a PNG (needs matplotlib). ``--model`` benchmarks a whole
segmenter (a small UPerNet-style network, ``benchmarks/decoder.py``) instead of the head alone, to set the
end-to-end overhead beside the papers' tables. ``--loop-reference`` also times training steps written with the
official code's per-class Python loops.

Peak memory: CUDA ``max_memory_allocated``; CPU: the process's resident-set high-water mark with glibc
returning freed blocks to the OS at once (``benchmarks/measure.py``), i.e. the peak of live tensor bytes.
The baseline's CE is this library's tiled ``upsampled_cross_entropy``; the ``conv+plainCE`` row
(``F.interpolate`` + ``F.cross_entropy``) is listed for reference.

Examples:
    python benchmarks/bench_heads.py                   # default sweep (512 px, strides 4 and 8), ~1.5 min on CPU
    python benchmarks/bench_heads.py --quick           # seconds
    python benchmarks/bench_heads.py --full --device cuda --dtype fp32 bf16
    python benchmarks/bench_heads.py --model --sizes 512 1024
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import adaptive_heads as ah  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    CPU_MEMORY_METHOD,
    count_ops,
    interleaved_median_times,
    median_time,
    memory_mode,
    peak_memory,
)

#: every registered head with its loss
HEADS = {name: (cls, cls.loss_type) for name, cls in ah.HEADS.items()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = report.MIB


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, unit="cfg", file=sys.stderr)
    except ImportError:

        def plain():
            for i, item in enumerate(items):
                print(f"[{desc} {i + 1}/{len(items)}] {item.cfg}", file=sys.stderr, flush=True)
                yield item

        return plain()


# ----------------------------------------------------------------------------- head-only runners
def _head_runners(name: str, c: int, n: int, feat: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None):
    """(inference fn, training fn) for one head; both close over fresh modules on feat's device."""
    device = feat.device
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    if name.startswith("conv"):
        module = nn.Conv2d(c, n, 1).to(device)

        def loss_fn(f):
            logits = module(f)
            if name == "conv+plainCE":
                up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
                return F.cross_entropy(up.float(), target, ignore_index=255)
            return ah.functional.upsampled_cross_entropy(logits, target)

    else:
        head_cls, loss_cls = HEADS[name]
        module = head_cls(c, n).to(device)
        criterion = loss_cls()

        def loss_fn(f):
            return criterion(module(f, target), target)["loss"]

    def infer():
        module.eval()
        with torch.no_grad(), autocast:
            return module(feat)

    def train():
        module.train()
        module.zero_grad(set_to_none=True)
        f = feat.detach().requires_grad_(True)
        with autocast:
            loss = loss_fn(f)
        loss.backward()

    return infer, train


def _model_runners(name: str, c: int, n: int, images: torch.Tensor, target: torch.Tensor, amp):
    from benchmarks.decoder import MiniUPerNet

    device = images.device
    torch.manual_seed(0)
    model = MiniUPerNet(n, channels=c).to(device)
    if name in HEADS:
        ah.replace_classifier(model, HEADS[name][0], num_classes=n)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def infer():
        model.eval()
        with torch.no_grad(), autocast:
            return model(images)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast:
            if name in HEADS:
                with ah.supervise(model, target) as sup:
                    logits = model(images)
                    loss = F.cross_entropy(logits.float(), target, ignore_index=255) + sup.loss()
            else:
                loss = F.cross_entropy(model(images).float(), target, ignore_index=255)
        loss.backward()

    return infer, train


# ----------------------------------------------------------------------------- one configuration
class Config:
    """One benchmark configuration: builds its rows and the runners of each row's head."""

    def __init__(self, cfg: dict, args) -> None:
        self.cfg, self.args = cfg, args
        self.device = torch.device(args.device)
        self.amp = None if cfg["dtype"] == "fp32" else DTYPES[cfg["dtype"]]
        size, n = cfg["size"], cfg["n"]
        gen = torch.Generator().manual_seed(0)
        self.target = torch.randint(0, n, (args.batch, size, size), generator=gen)
        self.target[:, : size // 16] = 255
        self.target = self.target.to(self.device)
        names = ["conv", *(["conv+plainCE"] if not args.model else []), *args.heads]
        self.rows = [{**cfg, "batch": args.batch, "head": nm, "device": args.device} for nm in names]

    def trains(self, name: str) -> bool:
        return not self.args.no_training and not (self.args.model and name == "conv+plainCE")

    @functools.cached_property
    def input(self) -> torch.Tensor:
        """The images (``--model``) or the features every row's head sees: one tensor, shared by the rows."""
        size, stride, c = (self.cfg[k] for k in ("size", "stride", "C"))
        b = self.args.batch
        gen = torch.Generator().manual_seed(1)
        if self.args.model:
            return torch.randn(b, 3, size, size, generator=gen).to(self.device)
        feat = torch.randn(b, c, size // stride, size // stride, generator=gen).relu()
        # under autocast a decoder hands its classifier half features: the head sees what it would see in a model
        return feat.to(device=self.device, dtype=self.amp or torch.float32)

    def runners(self, name: str):
        """``(infer, train, feat)``; ``feat`` is None in ``--model`` mode."""
        n, c = self.cfg["n"], self.cfg["C"]
        torch.manual_seed(0)
        if self.args.model:
            return (*_model_runners(name, c, n, self.input, self.target, self.amp), None)
        return (*_head_runners(name, c, n, self.input, self.target, self.amp), self.input)

    def warm_up(self) -> None:
        """Run every head once (inference and training) so one-time initialisations precede any measurement."""
        for row in self.rows:
            infer, train, _ = self.runners(row["head"])
            if not self.args.no_inference:
                infer()
            if self.trains(row["head"]):
                train()

    def measure_memory(self) -> None:
        for row in self.rows:
            infer, train, _ = self.runners(row["head"])
            if not self.args.no_inference:
                infer()  # warm-up: lazy initialisations are not the head's working memory
                row["infer_peak_bytes"] = peak_memory(infer, self.device)
            if self.trains(row["head"]):
                train()
                row["train_peak_bytes"] = peak_memory(train, self.device)

    def measure_time(self) -> None:
        """Medians over rounds that run every row once (``interleaved_median_times``), inference then training;
        the loop reference after, row by row."""
        args = self.args
        runners = {row["head"]: self.runners(row["head"]) for row in self.rows}
        if not args.no_inference:
            infer_s = interleaved_median_times({h: r[0] for h, r in runners.items()}, self.device, args.warmup,
                                               args.repeats)  # fmt: skip
            for row in self.rows:
                row["infer_s"] = infer_s[row["head"]]
                row["infer_fps"] = args.batch / row["infer_s"]
        training = {h: r[1] for h, r in runners.items() if self.trains(h)}
        if training:
            train_s = interleaved_median_times(training, self.device, args.warmup, args.train_repeats)
            for row in self.rows:
                if row["head"] in train_s:
                    row["train_s"] = train_s[row["head"]]
        for row in self.rows:
            _, train, feat = runners[row["head"]]
            if args.loop_reference and row["head"] in HEADS and feat is not None:
                from benchmarks.loop_reference import STEPS

                step, head = STEPS[row["head"]], HEADS[row["head"]][0](self.cfg["C"], self.cfg["n"]).to(self.device)
                f = feat.detach().requires_grad_(True)
                loop = lambda: step(head, f, self.target)  # noqa: B023, E731
                row["loop_train_s"] = median_time(loop, self.device, 0, args.train_repeats)
                row.update({f"loop_{k}": v for k, v in count_ops(loop).items()})
                row.update({f"train_{k}": v for k, v in count_ops(train).items()})
        report.add_relative(self.rows)


# ----------------------------------------------------------------------------- reporting
def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))

    def group(r: dict) -> tuple:
        return r["head"], r["stride"], r["n"], r["C"], r.get("dtype", "fp32")

    for head, stride, n, c, dtype in sorted({group(r) for r in rows if r["head"] != "conv"}):
        sel = sorted((r for r in rows if group(r) == (head, stride, n, c, dtype)), key=lambda r: r["size"])
        sizes = [r["size"] for r in sel]
        label = f"{head} s{stride} n{n} C{c} {dtype}"
        for ax, key in zip(axes, ("train_time_ratio", "train_extra_mib"), strict=False):
            if all(key in r for r in sel):
                ax.plot(sizes, [r[key] for r in sel], marker="o", label=label)
        if all("infer_time_ratio" in r for r in sel):
            ratios = [r["infer_time_ratio"] for r in sel]
            axes[0].plot(sizes, ratios, marker="x", linestyle="--", label=f"{label} (infer)")
    axes[0].set(xlabel="input size (px)", ylabel="time / conv baseline", title="time overhead")
    axes[1].set(xlabel="input size (px)", ylabel="extra MiB over conv + CE", title="training memory overhead")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", help="input sizes in px (default 512; --full: 512..2560)")
    p.add_argument("--strides", type=int, nargs="+", help="feature strides (default 4 8)")
    p.add_argument("--classes", type=int, nargs="+", help="class counts n (default 150; --full: 19 150)")
    p.add_argument("--channels", type=int, nargs="+", help="feature channels C (default 512; --full: 256 512)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS), help="heads (default all)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32"],
                   help="fp32, or autocast bf16/fp16 (half features into the head); several: rows of each")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=7, help="timed inference repeats (median; default 7)")
    p.add_argument("--train-repeats", type=int, default=2, help="timed training repeats (median; default 2)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls (default 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sweep that runs in seconds")
    p.add_argument("--full", action="store_true", help="the whole sweep (sizes 512-2560, both strides, n, C)")
    p.add_argument("--model", action="store_true", help="benchmark a whole MiniUPerNet instead of the head")
    p.add_argument("--loop-reference", action="store_true", help="also time per-class-loop training steps")
    p.add_argument("--no-inference", action="store_true", help="skip inference measurements")
    p.add_argument("--no-training", action="store_true", help="skip training measurements")
    p.add_argument("--out", type=Path, help="JSON output path (default benchmarks/results/<tag>.json)")
    p.add_argument("--tag", help="result name (default <device>[-model][-quick])")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write a PNG (matplotlib)")
    p.add_argument("--update-readme", action="store_true", help="replace the README block of this tag")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render", type=Path, metavar="JSON", help="print (and --update-readme) a saved result, no runs")
    return p.parse_args(argv)


def configs(args) -> list[dict]:
    if args.quick:
        sizes, strides, classes, channels = [128, 256], [4], [19], [64]
        args.repeats, args.train_repeats, args.warmup = 1, 1, 1
    elif args.full:
        sizes, strides, classes, channels = [512, 1024, 1280, 2048, 2560], [4, 8], [19, 150], [256, 512]
    else:
        sizes, strides, classes, channels = [512], [4, 8], [150], [512]
    sizes = args.sizes or sizes
    strides = [4] if args.model else (args.strides or strides)  # MiniUPerNet's features are at stride 4
    classes = args.classes or classes
    channels = args.channels or channels
    grid = itertools.product(sizes, strides, classes, channels, args.dtype)
    return [{"size": s, "stride": st, "n": n, "C": c, "dtype": d} for s, st, n, c, d in grid]


def render(args) -> list[dict]:
    """``--render``: the tables of a saved JSON, and its README block with ``--update-readme``."""
    data = json.loads(args.render.read_text())
    print(f"{data['meta']}\n\n{report.heads_tables(data['rows'])}")
    if args.update_readme:
        report.update_block(f"bench:{args.tag or args.render.stem}", report.bench_block(args.render.stem))
    return data["rows"]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.render:
        return render(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tag = args.tag or (args.device.split(":")[0] + ("-model" if args.model else "") + ("-quick" if args.quick else ""))
    out = args.out or ROOT / "benchmarks" / "results" / f"{tag}.json"
    work = [Config(cfg, args) for cfg in configs(args)]
    # every peak first, with the allocator in its measuring mode for the whole phase (see measure.py)
    with memory_mode():
        work[0].warm_up()  # thread pools, allocator arenas, oneDNN caches: not any head's working memory
        for config in _progress(work, not args.no_progress, "memory"):
            config.measure_memory()
    for config in _progress(work, not args.no_progress, "time"):
        config.measure_time()
    rows = [row for config in work for row in config.rows]
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    meta = (
        f"{device_name}, torch {torch.__version__}, {' and '.join(args.dtype)}, batch {args.batch}, "
        f"{'whole MiniUPerNet' if args.model else 'head only'}; memory: "
        f"{CPU_MEMORY_METHOD if args.device == 'cpu' else 'torch.cuda.max_memory_allocated'}"
    )
    print(f"\n{meta}\n\n{report.heads_tables(rows)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "commit": report.git_commit(), "args": sys.argv[1:], "rows": rows}, indent=1)
    )
    print(f"\nwrote {out}")
    if args.plot and plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    if args.update_readme:
        report.update_block(f"bench:{out.stem}", report.bench_block(out.stem))
    return rows


if __name__ == "__main__":
    main()
