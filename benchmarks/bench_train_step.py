"""Whole-model training step: each adaptive head against the conv with plain cross-entropy, time and peak memory.

The segmenter of ``bench_heads.py --model`` (``benchmarks/decoder.py``'s MiniUPerNet: UPerNet's 4C-channel FPN
concat, C = 512, n = 150, logits upsampled to the input inside the model) trains one step per head and size: the
``conv`` row is the model as built, its loss ``F.cross_entropy`` on the upsampled logits; each head replaces the
classifier with ``replace_classifier`` and trains inside ``supervise`` with ``F.cross_entropy(logits) +
sup.loss()``, every extra term of the head (the step ``bench_heads.py --model`` times). The step is forward, loss and
backward (no optimiser: the same for every row). Time is measured twice: the process's CPU time (all its threads,
``time.process_time``), which other jobs on a shared machine disturb far less, and the wall-clock time.

Each model first takes one small warm-up step (thread pools, oneDNN caches, lazy initialisations), then
``--steps`` measured steps, round-robin over the heads (a drift of a shared machine spreads over every head instead
of landing on one). Each measured step gives both its time and its peak memory: on CPU the peak resident set with
glibc returning freed blocks at once (``benchmarks/measure.py``; its page faults on fresh blocks are in the time,
for every row alike); on CUDA ``max_memory_allocated``. The JSON records the threads, the CPUs and the load average
before and after each size, so a run on a busy machine says so.

    python benchmarks/bench_train_step.py --threads 2          # 512 and 1024 px, one step each (~6 min on 2 idle cores)
    python benchmarks/bench_train_step.py --sizes 128 --channels 64 --out /tmp/quick.json     # seconds
    python benchmarks/render_docs.py       # then: the bench:cpu-train-step block and figures of docs/choosing.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.bench_heads import HEADS, _model_runners  # noqa: E402
from benchmarks.measure import CPU_MEMORY_METHOD, machine, memory_mode, peak_memory  # noqa: E402

MIB = report.MIB
WARMUP_SIZE = report.WARMUP_SIZE


def _inputs(size: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images ``[1, 3, size, size]`` and labels ``[1, size, size]`` (the top sixteenth ignored)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, n, (1, size, size), generator=gen)
    target[:, : size // 16] = 255
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return images.to(device), target.to(device)


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def measure(args) -> list[dict]:
    """One row per (size, head): median step seconds and peak bytes over ``args.steps`` steps."""
    device = torch.device(args.device)
    names = ["conv", *args.heads]
    rows = []
    for size in args.sizes:
        images, target = _inputs(size, args.classes, device)
        small = _inputs(WARMUP_SIZE, args.classes, device)
        load_before = _load()
        steps = {}
        with memory_mode():
            for name in names:  # one model per head, the same initial weights (seed 0 in _model_runners)
                _, train_small = _model_runners(name, args.channels, args.classes, *small, None)
                train_small()  # warm-up on a small input: none of the measured size's memory stays resident
                steps[name] = _model_runners(name, args.channels, args.classes, images, target, None)[1]
                del train_small
            seconds: dict[str, list[float]] = {name: [] for name in names}
            cpu_seconds: dict[str, list[float]] = {name: [] for name in names}
            peaks: dict[str, list[int]] = {name: [] for name in names}
            for _ in range(args.steps):
                for name in names:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    peak = peak_memory(steps[name], device)
                    seconds[name].append(time.perf_counter() - start)
                    cpu_seconds[name].append(time.process_time() - cpu_start)
                    if peak is not None:
                        peaks[name].append(peak)
        load_after = _load()
        for name in names:
            rows.append(
                {
                    "size": size,
                    "n": args.classes,
                    "C": args.channels,
                    "head": name,
                    "train_s": statistics.median(seconds[name]),
                    "train_s_all": seconds[name],
                    "train_cpu_s": statistics.median(cpu_seconds[name]),
                    "train_peak_bytes": max(peaks[name]) if peaks[name] else None,
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                }
            )
        base = next(r for r in rows if r["size"] == size and r["head"] == "conv")
        for r in rows:
            if r["size"] == size:
                r["train_time_ratio"] = r["train_s"] / base["train_s"]
                r["train_cpu_ratio"] = r["train_cpu_s"] / base["train_cpu_s"]
                if r["train_peak_bytes"] is not None and base["train_peak_bytes"] is not None:
                    r["train_extra_mib"] = (r["train_peak_bytes"] - base["train_peak_bytes"]) / MIB
                    r["train_extra_pct"] = (  # None where the conv step needed nothing above the start
                        100.0 * (r["train_peak_bytes"] - base["train_peak_bytes"]) / base["train_peak_bytes"]
                        if base["train_peak_bytes"] > 0
                        else None
                    )
        print(f"{size} px done, load average {load_before} -> {load_after}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="input sizes in px (default 512 1024)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS), help="heads (default all)")
    p.add_argument("--channels", type=int, default=512, help="decoder channels C (default 512)")
    p.add_argument("--classes", type=int, default=150, help="classes n (default 150)")
    p.add_argument("--steps", type=int, default=1, help="measured steps per head and size (median; default 1)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/<device>-train-step.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = measure(args)
    data = {
        "machine": machine(device),
        "memory": CPU_MEMORY_METHOD if device.type == "cpu" else "torch.cuda.max_memory_allocated",
        "steps": args.steps,
        "commit": report.git_commit(),
        "args": [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--out", str(args.out))],
        "rows": rows,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{device.type}-train-step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{report.train_step_setting(data)}\n\n{report.train_step_table(rows)}\n\nwrote {out}")
    return data


if __name__ == "__main__":
    main()
