"""Every figure of README.md and docs/ that comes from a result file, rendered from the committed JSON.

A page marks what is rendered, and this script writes it; ``tests/test_rendered_docs.py`` re-renders every mark
and fails when a page differs from its JSON. Two kinds of marks:

- **Blocks**, ``<!-- NAME:start -->`` … ``<!-- NAME:end -->``: everything between the marks is written by the
  renderer of ``NAME`` (:func:`render_block`): a table, the setting it was measured in, the command that measured
  it. A start mark may name its sources, ``<!-- camvid:start examples/results/camvid-unseen.json
  examples/results/camvid-finetune.json -->``: rendering a new result into the block (``train_camvid.py --render
  NEW.json --update-readme``) writes the new names into the mark, and the check follows them.
- **Inline figures** in prose, ``<!--fig KEY-->VALUE<!--/fig-->`` (invisible once rendered): ``VALUE`` is
  :func:`figure` of ``KEY``, a path into one result file:

  * ``camvid/STEM/CLASSIFIER/SPLIT/STAT``, from ``examples/results/STEM.json``: ``STAT`` is ``miou`` (mean over
    seeds), ``seedN`` (seed N's mIoU), ``min`` and ``max`` (the worst and the best seed's), ``std``, ``delta``
    (mean of the per-seed differences to the conv, signed), ``deltas`` (each, seed by seed: ``-0.3/+0.9/+0.1``),
    ``worst-delta`` (the smallest), ``gained`` (``3/3``: seeds above the conv), ``delta-vs-NAME`` (to another
    classifier), ``vs-STEM`` (to the same classifier and seeds in ``STEM.json``), ``iou-CLASS`` and
    ``iou-delta-CLASS`` (a class's IoU and its difference to the conv, means over seeds), ``delta-without-CLASS[+…]``
    (the mean IoU over the other classes, against the conv's); ``STAT@0`` rounds to 0
    decimals (default 1); ``cac+ssa`` as ``CLASSIFIER`` averages the two;
  * ``bench/STEM/SELECTOR/FIELD``, from ``benchmarks/results/STEM.json``: ``SELECTOR`` is ``key=value`` pairs
    joined by ``,`` that pick the rows (``size=2560,dtype=fp32,head=cac``; ``head!=conv``; ``mode~tile_context``:
    the value holds these words), ``FIELD`` one of :data:`FIELDS`, and with several rows ``FIELD~`` gives their
    range (``1.00–1.11``);
  * ``diag/SPLIT/HEAD/STAT``, from ``examples/results/camvid-unseen-diagnosis.json`` (``diag/STEM/SPLIT/HEAD/STAT``:
    from ``STEM-diagnosis.json``): see :func:`diagnosis_figure`;
  * ``tiles/STAT``, from ``examples/results/camvid-tiles.json``: ``image-behind-tile`` and ``cores-gain`` (the
    per-seed range of image context behind tile context, and of the cores against every tile pixel);
    ``tiles/CLASSIFIER/STAT``: their mean over seeds, ``adaptation`` (whole frames, adaptive minus static
    classifier), or a mode's mean mIoU (``whole``, ``static``, ``tile``, ``image``, ``image_all``); ``STAT@seedN``:
    seed N's alone;
  * ``robust/HELD_OUT/VARIANT/SPLIT/STAT``, from ``examples/results/camvid-robust.json``: see
    :func:`robust_figure`.

    python benchmarks/render_docs.py            # rewrite every stale block and figure, say which
    python benchmarks/render_docs.py --check    # only list them; exit status 1 if any
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "examples"):
    if str(_path) not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, str(_path))

from benchmarks import report  # noqa: E402
from benchmarks.report import BENCH_RESULTS, BLOCK, MIB, pages  # noqa: E402

EXAMPLE_RESULTS = ROOT / "examples" / "results"

#: ``<!--fig KEY-->VALUE<!--/fig-->`` on one line; a value holds no ``<`` nor a backtick (so a code span that shows
#: the syntax is not a figure)
FIGURE = re.compile(r"<!--fig (?P<key>[^ >]+)-->(?P<value>[^<`\n]*)<!--/fig-->")


@cache
def load(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(arg: str) -> Path:
    """A source named in a mark, relative to the repository root."""
    path = (ROOT / arg).resolve()
    if ROOT not in path.parents:
        raise ValueError(f"{arg}: a block's sources are files of this repository")
    return path


# ----------------------------------------------------------------------------- CamVid figures
def _runs(stem: str) -> list[dict]:
    return load(EXAMPLE_RESULTS / f"{stem}.json")["runs"]


def _by_seed(runs: list[dict], classifier: str) -> dict[int, dict]:
    found = {r["seed"]: r for r in runs if r["classifier"] == classifier}
    if not found:
        raise KeyError(f"no run of {classifier!r} (runs of {sorted({r['classifier'] for r in runs})})")
    return found


def camvid_figure(stem: str, classifier: str, split: str, stat: str) -> str:
    """One CamVid figure of ``examples/results/<stem>.json`` (see the module docstring)."""
    stat, _, digits = stat.partition("@")
    places = int(digits or 1)
    values = [_camvid_value(stem, name, split, stat) for name in classifier.split("+")]  # "cac+ssa": their mean
    if stat == "gained":
        return " and ".join(f"{sum(d > 0 for d in v)}/{len(v)}" for v in values)
    if stat == "deltas":
        return " and ".join("/".join(f"{d:+.{places}f}" for d in v) for v in values)
    value = statistics.mean(statistics.mean(v) for v in values)
    signed = stat.startswith(("delta", "iou-delta", "vs-")) or stat == "worst-delta"  # delta-without-… too
    return f"{value:+.{places}f}" if signed else f"{value:.{places}f}"


def _camvid_value(stem: str, classifier: str, split: str, stat: str) -> list[float]:
    """The per-seed values behind a CamVid figure (``std`` and ``worst-delta``: one value)."""
    runs = _runs(stem)
    mine = _by_seed(runs, classifier)

    def value(run: dict, cls: str | None) -> float:
        scores = run["splits"][split]
        return scores["miou"] if cls is None else scores["per_class_iou"][cls]

    def paired(base: str, cls: str | None = None) -> list[float]:
        other = _by_seed(runs, base)
        return [value(r, cls) - value(other[seed], cls) for seed, r in mine.items() if seed in other]

    if stat == "miou":
        return [value(r, None) for r in mine.values()]
    if stat.startswith("seed"):  # one seed's mIoU
        return [value(mine[int(stat.removeprefix("seed"))], None)]
    if stat == "std":
        return [statistics.stdev(value(r, None) for r in mine.values())]
    if stat in ("min", "max"):  # the worst or the best seed's mIoU
        return [(min if stat == "min" else max)(value(r, None) for r in mine.values())]
    if stat in ("delta", "gained", "deltas"):
        return paired("conv")
    if stat == "worst-delta":
        return [min(paired("conv"))]
    if stat.startswith("delta-vs-"):
        return paired(stat.removeprefix("delta-vs-"))
    if stat.startswith("vs-"):  # the same classifier and seeds in another result file
        other = _by_seed(_runs(stat.removeprefix("vs-")), classifier)
        return [value(r, None) - value(other[seed], None) for seed, r in mine.items() if seed in other]
    if stat.startswith("iou-delta-"):
        return paired("conv", stat.removeprefix("iou-delta-"))
    if stat.startswith("delta-without-"):  # the mean IoU over the other classes, against the conv's
        left_out = stat.removeprefix("delta-without-").split("+")
        other = _by_seed(runs, "conv")

        def rest(run: dict) -> float:
            ious = run["splits"][split]["per_class_iou"]
            return statistics.mean(v for c, v in ious.items() if c not in left_out)

        return [rest(r) - rest(other[seed]) for seed, r in mine.items() if seed in other]
    if stat.startswith("iou-"):
        return [value(r, stat.removeprefix("iou-")) for r in mine.values()]
    raise KeyError(f"unknown CamVid statistic {stat!r}")


# ----------------------------------------------------------------------------- benchmark figures
#: the benchmark fields a figure can show, each with its format
def _field(key: str, spec: str) -> Callable[[dict], str]:
    """A row's ``key`` formatted with ``spec``."""
    return lambda row: format(row[key], spec)


FIELDS: dict[str, Callable[[dict], str]] = {
    "infer_time_ratio": _field("infer_time_ratio", ".2f"),
    "train_time_ratio": _field("train_time_ratio", ".2f"),
    "train_time_ratio1": _field("train_time_ratio", ".1f"),
    "train_cpu_ratio": _field("train_cpu_ratio", ".2f"),
    "train_extra_mib": _field("train_extra_mib", "+.0f"),
    "train_extra_gib": lambda r: f"{r['train_extra_mib'] / 1024:.1f}",
    "train_extra_vs_plain_gib": lambda r: f"{r['train_extra_vs_plain_mib'] / 1024:+.1f}",
    "train_extra_copies": lambda r: (
        f"{r['train_extra_mib'] * MIB / (4 * r['C'] * (r['size'] // r['stride']) ** 2):.1f}"
    ),
    "train_peak_mib": lambda r: f"{r['train_peak_bytes'] / MIB:.0f}",
    "train_s": _field("train_s", ".1f"),
    "seconds": _field("seconds", ".1f"),
    "peak_mib": lambda r: f"{r['peak_bytes'] / MIB:.0f}",
    "loop_train_s": _field("loop_train_s", ".1f"),
    "speedup_vs_loop": _field("speedup_vs_loop", ".1f"),
    "ops_vs_loop": lambda r: f"{r['loop_ops'] / r['train_ops']:.0f}",
    "loop_syncs": _field("loop_syncs", ","),
}


def _select(rows: list[dict], selector: str) -> list[dict]:
    picked = rows
    for condition in filter(None, selector.split(",")):
        if "~" in condition:  # key~words: the value holds the words (``_`` for a space)
            key, words = condition.split("~")
            picked = [r for r in picked if words.replace("_", " ") in str(r.get(key))]
            continue
        negate = "!=" in condition
        key, value = condition.split("!=" if negate else "=")
        picked = [r for r in picked if (str(r.get(key)) == value) != negate]
    if not picked:
        raise KeyError(f"no row matches {selector!r}")
    return picked


def bench_figure(stem: str, selector: str, field: str) -> str:
    """One benchmark figure of ``benchmarks/results/<stem>.json`` (see the module docstring)."""
    rows = _select(load(BENCH_RESULTS / f"{stem}.json")["rows"], selector)
    spread = field.endswith("~")
    fmt = FIELDS[field.rstrip("~")]
    if not spread:
        if len(rows) > 1:
            raise KeyError(f"{selector!r} picks {len(rows)} rows of {stem}: narrow it, or ask for a range with ~")
        return fmt(rows[0])
    values = sorted((fmt(r) for r in rows), key=float)
    if values[0] == values[-1]:
        return values[0]
    return f"{values[0]}–{values[-1].removeprefix('+') if values[0].startswith('+') else values[-1]}"


# ----------------------------------------------------------------------------- tile figures
def _tiles() -> dict:
    return load(EXAMPLE_RESULTS / "camvid-tiles.json")


def _range(values: list[float]) -> str:
    return f"{min(values):.1f} to {max(values):.1f}"


def tiles_figure(*path: str) -> str:
    """``tiles/STAT`` (a per-seed range over both heads) or ``tiles/CLASSIFIER/STAT`` (a mean over seeds)."""
    rows = _tiles()["rows"]
    stat, _, seed = path[-1].partition("@seed")
    if len(path) == 2:
        rows = [r for r in rows if r["classifier"] == path[0] and seed in ("", str(r["seed"]))]
    differences = {
        "image-behind-tile": [r["tile"] - r["image"] for r in rows],
        "cores-gain": [r["image"] - r["image_all"] for r in rows],
        "adaptation": [r["whole"] - r["static"] for r in rows],  # whole frames: adaptive - static classifier
    }
    if stat not in differences and (len(path) == 1 or stat not in rows[0]):
        raise KeyError(f"unknown tiles statistic {'/'.join(path)!r}")
    if len(path) == 1:
        return _range(differences[stat])
    if stat in differences:
        return f"{statistics.mean(differences[stat]):+.1f}"
    return f"{statistics.mean(r[stat] for r in rows):.1f}"


def diagnosis_figure(split: str, head: str, stat: str, stem: str = "camvid-unseen") -> str:
    """``diag/SPLIT/HEAD/STAT`` from ``examples/results/camvid-unseen-diagnosis.json`` (``diag/STEM/SPLIT/HEAD/STAT``:
    from ``STEM-diagnosis.json``), a mean over seeds (``HEAD`` ``cac``, ``ssa`` or ``cac+ssa``): ``coarse_miou``,
    ``adaptation`` (head − its coarse prediction), ``confidence``, ``share-CLASS[+CLASS…]`` (% of the labelled
    pixels), ``purity-CLASS``, ``coarse-iou-CLASS``; ``STAT@N`` rounds to N decimals."""
    stat, _, digits = stat.partition("@")
    rows = [
        r
        for r in load(EXAMPLE_RESULTS / f"{stem}-diagnosis.json")["rows"]
        if r["split"] == split and r["classifier"] in head.split("+")
    ]
    if not rows:
        raise KeyError(f"no diagnosis of {head!r} on {split!r}")
    getters: dict[str, tuple[Callable[[dict], float], int, str]] = {
        "coarse_miou": (lambda r: r["coarse_miou"], 1, ""),
        "adaptation": (lambda r: r["miou"] - r["coarse_miou"], 1, "+"),
        "confidence": (lambda r: r["confidence"], 2, ""),
    }
    if stat.startswith("share-"):
        classes = stat.removeprefix("share-").split("+")
        getters[stat] = (lambda r: 100 * sum(r["class_share"][c] for c in classes), 1, "")
    elif stat.startswith("purity-"):
        getters[stat] = (lambda r: r["purity"][stat.removeprefix("purity-")], 2, "")
    elif stat.startswith("coarse-iou-"):
        getters[stat] = (lambda r: r["coarse_per_class_iou"][stat.removeprefix("coarse-iou-")], 1, "")
    if stat not in getters:
        raise KeyError(f"unknown diagnosis statistic {stat!r}")
    get, places, sign = getters[stat]
    return f"{statistics.mean(get(r) for r in rows):{sign}.{int(digits or places)}f}"


def figure(key: str) -> str:
    """The text of the inline figure ``key`` (grammar in the module docstring)."""
    family, _, rest = key.partition("/")
    parts = rest.split("/")
    if family == "camvid" and len(parts) == 4:
        return camvid_figure(*parts)
    if family == "bench" and len(parts) == 3:
        return bench_figure(*parts)
    if family == "diag" and len(parts) == 3:
        return diagnosis_figure(*parts)
    if family == "diag" and len(parts) == 4:
        return diagnosis_figure(*parts[1:], stem=parts[0])
    if family == "tiles" and len(parts) in (1, 2):
        return tiles_figure(*parts)
    if family == "robust" and len(parts) == 4:
        return robust_figure(*parts)
    raise KeyError(f"unknown figure {key!r}: see benchmarks/render_docs.py for the keys")


# ----------------------------------------------------------------------------- blocks
def _camvid_blocks(args: list[str]) -> tuple[str, str]:
    from examples import train_camvid

    result, *finetune = (_source(a) for a in args)
    return train_camvid.render_parts(result, finetune[0] if finetune else None)


def _camvid_table(args: list[str]) -> str:
    """``camvid-table``: the headline table (mIoU per split and Δ vs conv) of one result, and its command."""
    from examples import train_camvid

    result = load(_source(args[0]))
    order = ("unseen", "holdout", "val", "test")
    splits = tuple(s for s in order if all(s in r["splits"] for r in result["runs"]))
    return f"{train_camvid.headline_table(result['runs'], splits)}\n\n```bash\n{train_camvid.command(result)}\n```"


def _camvid_seeds(args: list[str]) -> str:
    """``camvid-seeds``: val mIoU per seed and their mean, one row per ``FILE:CLASSIFIER:LABEL`` argument (``_``
    for a space in the label), e.g. the runs of one classifier under several settings."""
    rows = [arg.split(":") for arg in args]
    runs = {(path, name): _by_seed(load(_source(path))["runs"], name) for path, name, _ in rows}
    seeds = sorted({seed for found in runs.values() for seed in found})
    lines = ["| val mIoU | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---" * (len(seeds) + 2) + "|"]
    for path, name, label in rows:
        values = [runs[path, name][s]["splits"]["val"]["miou"] for s in seeds]
        cells = [f"{v:.1f}" for v in values] + [f"{statistics.mean(values):.1f}"]
        lines.append(f"| {label.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _camvid_diagnosis(args: list[str]) -> str:
    """``camvid-diagnosis DIAGNOSIS``: ``camvid_diagnose.py``'s result (means over seeds and over CAC and SSA-Seg)
    beside the heads' per-class gain over the conv in the run it diagnosed."""
    data = load(_source(args[0]))
    rows, classes = data["rows"], data["classes"]
    runs = load(EXAMPLE_RESULTS / data["run"])["runs"]
    splits = list(dict.fromkeys(r["split"] for r in rows))
    heads = list(dict.fromkeys(r["classifier"] for r in rows))
    titles = {"val": "val (seen sequence)", "unseen": "unseen sequence"}

    def mean(split: str, get: Callable[[dict], float], head: str | None = None) -> float:
        return statistics.mean(get(r) for r in rows if r["split"] == split and head in (None, r["classifier"]))

    def per_head(get: Callable[[dict], float], fmt: str) -> list[str]:
        return [" / ".join(format(mean(s, get, h), fmt) for h in heads) for s in splits]

    def gain(split: str, cls: str) -> float:  # heads − conv IoU, mean over the heads and the seeds
        conv = {r["seed"]: r["splits"][split]["per_class_iou"][cls] for r in runs if r["classifier"] == "conv"}
        return statistics.mean(
            r["splits"][split]["per_class_iou"][cls] - conv[r["seed"]] for r in runs if r["classifier"] in heads
        )

    names = " / ".join({"cac": "CAC", "ssa": "SSA-Seg"}.get(h, h) for h in heads)
    table = [
        ("| | " + " | ".join(titles.get(s, s) for s in splits) + " |"),
        "|---" * (len(splits) + 1) + "|",
        f"| head mIoU ({names}) | " + " | ".join(per_head(lambda r: r["miou"], ".1f")) + " |",
        "| the same networks' coarse prediction | " + " | ".join(per_head(lambda r: r["coarse_miou"], ".1f")) + " |",
        "| head − its own coarse prediction | "
        + " | ".join(per_head(lambda r: r["miou"] - r["coarse_miou"], "+.1f"))
        + " |",
        "| coarse confidence (mean max-softmax) | "
        + " | ".join(f"{mean(s, lambda r: r['confidence']):.2f}" for s in splits)
        + " |",
        f"| mean purity over the {len(classes)} classes | "
        + " | ".join(f"{mean(s, lambda r: statistics.mean(r['purity'].values())):.2f}" for s in splits)
        + " |",
    ]
    share = lambda v: f"{100 * v:.1f}" if v >= 0.001 else f"{100 * v:.2f}"  # noqa: E731
    per_class = [
        "| class | share of pixels, " + " / ".join(splits) + " (%) | purity, " + " / ".join(splits)
        + " | heads − conv IoU, " + " / ".join(splits) + " |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for cls in classes:
        cells = [
            " / ".join(share(mean(s, lambda r, c=cls: r["class_share"][c])) for s in splits),
            " / ".join(f"{mean(s, lambda r, c=cls: r['purity'][c]):.2f}" for s in splits),
            " / ".join(f"{gain(s, cls):+.1f}" for s in splits),
        ]
        per_class.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(table) + "\n\n" + "\n".join(per_class)


def _tiles_table() -> str:
    """val mIoU of whole frames and of the tiled modes, CAC and SSA-Seg, means over seeds."""
    rows = _tiles()["rows"]
    names = {"cac": "CAC", "ssa": "SSA-Seg"}
    modes = ("whole", "tile", "image", "image_all")
    lines = [
        "| val mIoU (3 seeds) | whole frame | tiles, tile context | tiles, image context (cores) "
        "| tiles, image context (every tile pixel) |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["classifier"] for r in rows):
        rs = [r for r in rows if r["classifier"] == name]
        cells = [f"{statistics.mean(r[m] for r in rs):.1f}" for m in modes]
        lines.append(f"| {names.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tiles_block() -> str:
    behind = [r["tile"] - r["image"] for r in _tiles()["rows"]]
    return (
        "The CamVid networks of the earlier all-frames run ([CamVid experiment](camvid.md#earlier-runs): trained on "
        "all 367 training frames, scored on val; 180×240 frames, tiles 90×120, stride 60×80):\n\n"
        f"{_tiles_table()}\n\n"
        f"Tile context is ahead of image context on {'every seed' if min(behind) > 0 else 'some seeds'} (by "
        f"{tiles_figure('image-behind-tile')} points), and taking the image statistics from the tiles' cores "
        f"instead of every tile pixel gains {tiles_figure('cores-gain')}. Why, and what a perfect image context "
        "gives, in [CamVid: tiles](camvid.md#tiles). `python examples/camvid_tiles.py --data path/to/CamVid`, "
        "`examples/results/camvid-tiles.json`."
    )


def _extra_loss_terms() -> dict[str, int]:
    """Each head's loss terms besides the main CE and the total, counted on a tiny random batch."""
    import torch

    import adaptive_heads as ah

    counts = {}
    for name, cls in ah.HEADS.items():
        torch.manual_seed(0)
        head = cls(8, 5)
        target = torch.randint(0, 5, (2, 16, 16))
        losses = cls.loss_type()(head(torch.randn(2, 8, 8, 8), target), target)
        counts[name] = len(set(losses) - {"ce", "loss"})
    return counts


def _choosing_block() -> str:
    """The table of docs/choosing.md: what each head gained on CamVid and what it costs, from six result files."""
    heads = ("cac", "ssa", "proto")
    dusk = {r["classifier"] for r in _runs("camvid-unseen-dusk")}
    tuned = {r["classifier"] for r in _runs("camvid-finetune")}
    step_sizes = sorted({r["size"] for r in load(BENCH_RESULTS / "cpu-train-step.json")["rows"]})
    sizes = " / ".join(str(s) for s in step_sizes)

    def gain(stem: str, split: str, available: set[str] | None = None) -> list[str]:
        """Per head: the mean of the per-seed differences to the conv, and how many seeds gained."""
        return [
            f"{figure(f'camvid/{stem}/{h}/{split}/delta')} ({figure(f'camvid/{stem}/{h}/{split}/gained')})"
            if available is None or h in available
            else "not run"
            for h in heads
        ]

    def bench(stem: str, selector: str, field: str, suffix: str = "", prefix: str = "") -> list[str]:
        return [prefix + bench_figure(stem, f"{selector},head={h}", field) + suffix for h in heads]

    def step(field: str, suffix: str) -> list[str]:
        """Per head: the whole-model training step's ``field`` at each size, ``a / b``."""
        return [
            " / ".join(bench_figure("cpu-train-step", f"size={s},head={h}", field) for s in step_sizes) + suffix
            for h in heads
        ]

    terms = _extra_loss_terms()
    rows = [
        ("CamVid, **unseen sequence** (daylight), trained from scratch: mIoU over the conv (seeds that gained)",
         gain("camvid-unseen", "unseen")),
        ("CamVid, unseen dusk sequence, from scratch", gain("camvid-unseen-dusk", "unseen", dusk)),
        ("CamVid `val` (frames of a sequence the network trained on), from scratch", gain("camvid-unseen", "val")),
        ("fitted onto the trained conv network (3 epochs), unseen sequence, over continuing the conv",
         gain("camvid-finetune", "unseen", tuned)),
        ("whole-model inference time at 512 px, × conv (CPU, MiniUPerNet)",
         bench("cpu-model", "size=512", "infer_time_ratio", "×")),
        (f"whole-model training step, CPU time at {sizes} px, × conv + `F.cross_entropy`",
         step("train_cpu_ratio", "×")),
        (f"whole-model training peak memory at {sizes} px, MiB over conv + `F.cross_entropy`",
         step("train_extra_mib", "")),
        ("head-only training peak at 2560 px (float32), GiB over conv + `F.interpolate` + `F.cross_entropy`",
         bench("cpu-2560", "size=2560,dtype=fp32", "train_extra_vs_plain_gib")),
        ("the same over conv + this library's tiled CE (`upsampled_cross_entropy`)",
         bench("cpu-2560", "size=2560,dtype=fp32", "train_extra_gib", "", "+")),
        ("extra loss terms", [str(terms[h]) for h in heads]),
    ]  # fmt: skip
    lines = ["| | CAC | SSA-Seg | ProtoSeg |", "|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    sources = (
        "examples/results/camvid-unseen.json", "examples/results/camvid-unseen-dusk.json",
        "examples/results/camvid-finetune.json", "benchmarks/results/cpu-model.json",
        "benchmarks/results/cpu-train-step.json", "benchmarks/results/cpu-2560.json",
    )  # fmt: skip
    lines += ["", "From " + ", ".join(f"`{s}`" for s in sources) + "; the loss terms counted from the losses."]
    return "\n".join(lines)


ROBUST_BASELINES = (EXAMPLE_RESULTS / "camvid-unseen.json", EXAMPLE_RESULTS / "camvid-unseen-dusk.json")


@cache
def _robust_table() -> dict[tuple[str, str], dict]:
    """``camvid_robust.summarise`` of ``examples/results/camvid-robust.json``, by (held-out sequence, variant)."""
    import camvid_robust

    rows = load(EXAMPLE_RESULTS / "camvid-robust.json")["rows"]
    table = camvid_robust.summarise(rows, camvid_robust.conv_baseline(list(ROBUST_BASELINES)))
    return {(e["holdout_sequence"], e["variant"]): e for e in table}


def robust_figure(held_out: str, variant: str, split: str, stat: str) -> str:
    """``robust/HELD_OUT/VARIANT/SPLIT/STAT`` from ``examples/results/camvid-robust.json`` (means over seeds, Δ to
    the conv of the same seeds): ``delta``, ``worst-delta`` (the worst seed's), ``worst-class`` (``Building -1.7``),
    ``iou-delta-CLASS``; ``VARIANT`` as in its table (``cac[confident]``)."""
    entry = _robust_table()[(held_out, variant)][split]
    if stat == "delta":
        return f"{entry['delta_mean']:+.1f}"
    if stat == "worst-delta":
        return f"{entry['delta_min']:+.1f}"
    if stat == "worst-class":
        return f"{entry['worst_class']} {entry['worst_class_delta']:+.1f}"
    if stat.startswith("iou-delta-"):
        return f"{entry['per_class_delta'][stat.removeprefix('iou-delta-')]:+.1f}"
    raise KeyError(f"unknown robustness statistic {stat!r}")


def _robust_block(name: str, args: list[str]) -> str:
    import camvid_robust

    result = load(_source(args[0]) if args else EXAMPLE_RESULTS / "camvid-robust.json")
    runs = list(ROBUST_BASELINES)
    base = camvid_robust.conv_baseline(runs)
    if name == "camvid-robust-headline":
        return camvid_robust.headline(result, base, camvid_robust.trained_rows(runs))
    return camvid_robust.render(result, base)


def render_block(name: str, args: list[str]) -> str:
    """The content of the block ``name`` (its start mark's ``args``: the sources it names).

    - ``bench:STEM``: ``benchmarks/results/STEM.json`` by the script that wrote it (``bench_heads.py``,
      ``bench_slide.py``, ``bench_train_step.py``): the setting, the command, the table;
    - ``camvid RESULT [FINETUNE]`` and ``camvid-details RESULT [FINETUNE]``: the README's CamVid section and the
      docs page's results (``train_camvid.py --render``);
    - ``camvid-table RESULT``: one CamVid result's mIoU per split and Δ vs conv, and its command;
    - ``camvid-diagnosis DIAGNOSIS``: ``camvid_diagnose.py``'s tables, with the per-class gains of the run;
    - ``camvid-seeds FILE:CLASSIFIER:LABEL ...``: val mIoU per seed, one row per argument (``_`` for a space);
    - ``camvid-tiles`` (with its reading) and ``camvid-tiles-table``: ``examples/results/camvid-tiles.json``;
    - ``choosing``: the table of docs/choosing.md, from six result files and the losses;
    - ``camvid-robust RESULT`` and ``camvid-robust-headline RESULT``: ``camvid_robust.py``'s tables (every variant
      tried, per held-out sequence, against the conv runs of ``camvid-unseen.json`` and ``camvid-unseen-dusk.json``)
      and the README's first lines on CamVid.
    """
    if name.startswith("bench:"):
        return report.bench_block(name.removeprefix("bench:"))
    if name == "camvid":
        return _camvid_blocks(args)[0]
    if name == "camvid-details":
        return _camvid_blocks(args)[1]
    if name == "camvid-table":
        return _camvid_table(args)
    if name == "camvid-diagnosis":
        return _camvid_diagnosis(args)
    if name == "camvid-seeds":
        return _camvid_seeds(args)
    if name == "camvid-tiles":
        return _tiles_block()
    if name == "camvid-tiles-table":
        return _tiles_table()
    if name == "choosing":
        return _choosing_block()
    if name in ("camvid-robust", "camvid-robust-headline"):
        return _robust_block(name, args)
    raise KeyError(f"no renderer for the block {name!r}: see benchmarks/render_docs.py")


# ----------------------------------------------------------------------------- pages
def render_page(text: str) -> str:
    """``text`` with every block and inline figure rendered again."""

    def block(match: re.Match) -> str:
        name, args = match["name"], match["args"].split()
        body = render_block(name, args)
        return f"<!-- {name}:start{match['args']} -->\n{body}\n<!-- {name}:end -->"

    text = BLOCK.sub(block, text)
    return FIGURE.sub(lambda m: f"<!--fig {m['key']}-->{figure(m['key'])}<!--/fig-->", text)


def stale(page: Path) -> list[str]:
    """What of ``page`` differs from its JSON: the blocks by name, the figures by key, with the two texts."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        if (match["body"] or "") != render_block(match["name"], match["args"].split()):
            found.append(f"block {match['name']}")
    for match in FIGURE.finditer(text):
        value = figure(match["key"])
        if match["value"] != value:
            found.append(f"figure {match['key']}: the page says {match['value']!r}, the JSON {value!r}")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="list the stale blocks and figures, write nothing")
    args = p.parse_args(argv)
    status = 0
    for page in pages():
        found = stale(page)
        if not found:
            continue
        name = page.relative_to(ROOT)
        if args.check:
            status = 1
            print(f"{name}: " + "; ".join(found))
        else:
            page.write_text(render_page(page.read_text()))
            print(f"updated {name}: " + "; ".join(found))
    return status


if __name__ == "__main__":
    sys.exit(main())
