"""Tables and README/docs blocks of the benchmark results: what every benchmark script and
``benchmarks/render_docs.py`` use to present a result, and nothing that measures (it imports no benchmark).

A block of a page is ``<!-- NAME:start ARGS -->`` … ``<!-- NAME:end -->``; ``bench:STEM`` blocks show
``benchmarks/results/STEM.json`` (:func:`bench_block`), written by the benchmark that measured it (``--update-readme``)
or re-rendered from the JSON by ``benchmarks/render_docs.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_RESULTS = ROOT / "benchmarks" / "results"
MIB = 2**20
#: the small warm-up step ``bench_train_step.py`` takes before measuring
WARMUP_SIZE = 128

#: ``<!-- NAME:start ARGS -->`` … ``<!-- NAME:end -->``; NAME without spaces, ARGS optional
BLOCK = re.compile(
    r"<!-- (?P<name>[\w:.-]+):start(?P<args>(?: [^ >]+)*) -->\n(?:(?P<body>.*?)\n)?<!-- (?P=name):end -->", re.S
)


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def replace_block(page: Path, name: str, body: str, args: list[str] | None = None) -> None:
    """Write ``body`` into the block ``name`` of ``page`` (with ``args``: the sources its start mark names)."""
    text = page.read_text()
    match = next((m for m in BLOCK.finditer(text) if m["name"] == name), None)
    if match is None:
        raise SystemExit(f"{page} has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    marks = match["args"] if args is None else "".join(f" {a}" for a in args)
    new = f"<!-- {name}:start{marks} -->\n{body}\n<!-- {name}:end -->"
    page.write_text(text[: match.start()] + new + text[match.end() :])


def update_block(name: str, body: str) -> Path:
    """Replace the block ``name`` of whichever page holds it (README.md or docs/), say which, return that page."""
    for page in pages():
        if any(match["name"] == name for match in BLOCK.finditer(page.read_text())):
            replace_block(page, name, body)
            print(f"updated {page.relative_to(ROOT)} block {name!r}")
            return page
    raise SystemExit(f"no page holds a <!-- {name}:start --> ... <!-- {name}:end --> block")


def git_commit() -> str | None:
    """The checkout's commit, short (``"1a2b3c4"``, ``"1a2b3c4+"`` with uncommitted changes to tracked files), for
    a result's provenance; ``None`` outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(data: dict) -> str:
    """``" — commit X"`` and the result's ``note`` where its JSON records them (both optional)."""
    text = f"; commit {data['commit']}" if data.get("commit") else ""
    return text + (f". {data['note']}" if data.get("note") else "")


def _command(script: str, args: list[str]) -> str:
    return f"python benchmarks/{script} " + " ".join(a for a in args if a != "--update-readme")


# ----------------------------------------------------------------------------- shared
def add_relative(rows: list[dict], phases: tuple[str, ...] = ("infer", "train")) -> None:
    """Each row against the ``conv`` row of the same list: time ratios and extra peak memory (MiB and percent) per
    phase, the extra over the ``conv+plainCE`` row where there is one, the speed-up over the loop reference."""
    base = next(r for r in rows if r["head"] == "conv")
    for r in rows:
        for phase in phases:
            if f"{phase}_s" in r and f"{phase}_s" in base:
                r[f"{phase}_time_ratio"] = r[f"{phase}_s"] / base[f"{phase}_s"]
            pk, bpk = r.get(f"{phase}_peak_bytes"), base.get(f"{phase}_peak_bytes")
            if pk is not None and bpk is not None:
                r[f"{phase}_extra_mib"] = (pk - bpk) / MIB
                r[f"{phase}_extra_pct"] = 100.0 * (pk - bpk) / max(bpk, 1)
        plain = next((p for p in rows if p["head"] == "conv+plainCE"), None)
        if plain and r.get("train_peak_bytes") is not None and plain.get("train_peak_bytes") is not None:
            r["train_extra_vs_plain_mib"] = (r["train_peak_bytes"] - plain["train_peak_bytes"]) / MIB
        if "loop_train_s" in r:
            r["speedup_vs_loop"] = r["loop_train_s"] / r["train_s"]
        for key in ("train_ops", "infer_ops", "train_kernels", "infer_kernels"):  # the conv's, beside each count
            if r.get(key) is not None and base.get(key) is not None:
                r[f"{key}_conv"] = base[key]


# ----------------------------------------------------------------------------- bench_heads.py
def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _extra(r: dict, phase: str) -> str:
    """``+76 (+43 %)``: extra MiB over the conv baseline and the same in percent."""
    mib, pct = r.get(f"{phase}_extra_mib"), r.get(f"{phase}_extra_pct")
    return "–" if mib is None else f"{mib:+.0f} ({pct:+.0f} %)"


_INFER_COLUMNS = [
    ("infer ms", lambda r: _fmt(r.get("infer_s") and r["infer_s"] * 1e3, ".1f")),
    ("fps", lambda r: _fmt(r.get("infer_fps"), ".1f")),
    ("infer × conv", lambda r: _fmt(r.get("infer_time_ratio"), ".2f")),
    ("infer peak MiB", lambda r: _fmt(r.get("infer_peak_bytes") and r["infer_peak_bytes"] / MIB, ".0f")),
    ("infer extra MiB", lambda r: _extra(r, "infer")),
]
_TRAIN_COLUMNS = [
    ("train ms", lambda r: _fmt(r.get("train_s") and r["train_s"] * 1e3, ".0f")),
    ("train × conv", lambda r: _fmt(r.get("train_time_ratio"), ".2f")),
    ("train peak MiB", lambda r: _fmt(r.get("train_peak_bytes") and r["train_peak_bytes"] / MIB, ".0f")),
    ("train extra MiB", lambda r: _extra(r, "train")),
    ("train extra vs plain-CE conv", lambda r: _fmt(r.get("train_extra_vs_plain_mib"), "+.0f")),
]


def heads_table(rows: list[dict]) -> str:
    """One row per (configuration, head); inference or training columns only when measured."""
    keys = ("size", "stride", "n", "C", *(["dtype"] if len({r.get("dtype") for r in rows}) > 1 else []), "head")
    columns = [(k, (lambda r, k=k: str(r[k]))) for k in keys]
    if any("infer_s" in r for r in rows):
        columns += _INFER_COLUMNS
    if any("train_s" in r for r in rows):
        columns += _TRAIN_COLUMNS
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def loop_table(rows: list[dict]) -> str:
    """Training step against the per-class-loop implementation (``--loop-reference`` rows only)."""
    lines = [
        "| size | stride | n | C | head | train ms | loop-reference ms | speed-up | aten ops / step (ours / loop) "
        "| host syncs / step (ours / loop) |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        if "loop_train_s" not in r:
            continue
        lines.append(
            f"| {r['size']} | {r['stride']} | {r['n']} | {r['C']} | {r['head']} | {r['train_s'] * 1e3:.0f} "
            f"| {r['loop_train_s'] * 1e3:.0f} | {r['speedup_vs_loop']:.1f}× | {r['train_ops']} / {r['loop_ops']} "
            f"| {r['train_syncs']} / {r['loop_syncs']} |"
        )
    return "\n".join(lines)


def heads_tables(rows: list[dict]) -> str:
    """The main table, and the loop comparison when the rows have one."""
    table = heads_table(rows)
    if any("loop_train_s" in r for r in rows):
        table += "\n\n" + loop_table(rows)
    return table


# ----------------------------------------------------------------------------- bench_slide.py
def slide_table(rows: list[dict]) -> str:
    """Markdown: per slide mode, its tiles, time and peak against whole-image inference."""
    whole = rows[0]["peak_bytes"]
    lines = ["| mode | tiles | time s | peak MiB | peak vs whole image |", "|---|---|---|---|---|"]
    for r in rows:
        peak = r["peak_bytes"]
        ratio = f"{100 * peak / whole:.0f} %" if peak is not None and whole else "—"
        mib = f"{peak / MIB:.0f}" if peak is not None else "—"
        lines.append(f"| {r['mode']} | {r['tiles']} | {r['seconds']:.1f} | {mib} | {ratio} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bench_train_step.py
def _ms(seconds: float) -> str:
    """Milliseconds with three significant digits at least (``12.3``, ``2345``)."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def train_step_table(rows: list[dict]) -> str:
    """Markdown: per size and head, the step's CPU time, wall time and peak, each against the conv with plain CE."""
    lines = [
        "| size | head | CPU ms | CPU × conv | wall ms | wall × conv | train peak MiB | extra MiB over conv |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "—" if r["train_peak_bytes"] is None else f"{r['train_peak_bytes'] / MIB:.0f}"
        extra = "—" if "train_extra_mib" not in r else f"{r['train_extra_mib']:+.0f}"
        if r.get("train_extra_pct") is not None:
            extra += f" ({r['train_extra_pct']:+.0f} %)"
        label = "conv + `F.cross_entropy`" if r["head"] == "conv" else r["head"]
        lines.append(
            f"| {r['size']} | {label} | {_ms(r['train_cpu_s'])} | {r['train_cpu_ratio']:.2f} | {_ms(r['train_s'])} "
            f"| {r['train_time_ratio']:.2f} | {peak} | {extra} |"
        )
    return "\n".join(lines)


def train_step_setting(data: dict) -> str:
    """The setting line of a saved result: machine, threads, how busy it was, what was measured."""
    m = data["machine"]
    loads = [v for r in data["rows"] for v in (r["load_average_before"], r["load_average_after"]) if v]
    busy = (
        f"; 1-min load average {min(v[0] for v in loads):.1f} to {max(v[0] for v in loads):.1f} on "
        f"{m['cpus']} CPUs during the run"
        + (" (a shared machine: other jobs ran beside it, so the wall times are not comparable)"
           if max(v[0] for v in loads) > m["cpus"] else "")
        if loads
        else ""
    )  # fmt: skip
    return (
        f"{m['device']}, {m['threads']} threads, torch {m['torch']}, fp32, batch 1, whole MiniUPerNet "
        f"(C = {data['rows'][0]['C']}, n = {data['rows'][0]['n']}), forward + loss + backward, median of "
        f"{data['steps']} step(s) per head after a {WARMUP_SIZE}-px warm-up step{busy}; memory: {data['memory']}"
    )


def train_step_command(data: dict) -> str:
    return ("python benchmarks/bench_train_step.py " + " ".join(data["args"])).strip()


# ----------------------------------------------------------------------------- bench_segmenter.py
def segmenter_table(rows: list[dict]) -> str:
    """Markdown: per size, precision and head, inference and a training step against the conv, and their op counts."""

    def cell(r: dict, key: str, spec: str, scale: float = 1.0) -> str:
        return "–" if r.get(key) is None else format(r[key] * scale, spec)

    def ops(r: dict, key: str) -> str:
        value = r.get(key)
        if value is None:
            return "–"
        base = r.get(f"{key}_conv")
        return str(value) if base is None or r["head"] == "conv" else f"{value} ({value - base:+d})"

    kernels = any(r.get("train_kernels") for r in rows)
    header = ["size", "dtype", "head", "infer ms", "infer × conv", "train step ms", "train × conv", "train peak MiB",
              "peak × conv", "train ops", "infer ops"]  # fmt: skip
    header += ["train kernels", "infer kernels"] if kernels else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        peak = r.get("train_peak_bytes")
        cells = [
            str(r["size"]), r["dtype"], "conv + `F.cross_entropy`" if r["head"] == "conv" else r["head"],
            cell(r, "infer_s", ".1f", 1e3), cell(r, "infer_time_ratio", ".2f"), cell(r, "train_s", ".1f", 1e3),
            cell(r, "train_time_ratio", ".2f"), "–" if peak is None else f"{peak / MIB:.0f}",
            "–" if r.get("train_extra_pct") is None else f"{1 + r['train_extra_pct'] / 100:.3f}",
            ops(r, "train_ops"), ops(r, "infer_ops"),
        ]  # fmt: skip
        if kernels:
            cells += [ops(r, "train_kernels"), ops(r, "infer_kernels")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def segmenter_setting(data: dict) -> str:
    m = data["machine"]
    measured = "aten ops on the meta device only" if data["ops_only"] else f"memory: {data['memory']}"
    if not data["ops_only"] and data.get("memory_budget_mib") is not None:
        measured += f"; adaptive_heads.memory_budget {data['memory_budget_mib']} MiB"
    row = data["rows"][0]
    return (
        f"{m['device']}, {m['threads']} threads, torch {m['torch']}, torchvision `deeplabv3_resnet50` (weights none), "
        f"n = {row['n']}, batch {row['batch']}; training step = forward, `F.cross_entropy` + `sup.loss()`, backward, "
        "SGD step; ops: aten ops of a float32 step's forward, loss and backward on the meta device, views excluded "
        f"(the difference to the conv in brackets); {measured}"
    )


def segmenter_block(data: dict) -> str:
    command = _command("bench_segmenter.py", data["args"])
    return f"{segmenter_setting(data)}{provenance(data)}\n\n```bash\n{command}\n```\n\n{segmenter_table(data['rows'])}"


# ----------------------------------------------------------------------------- any result
def bench_block(stem: str) -> str:
    """``benchmarks/results/<stem>.json``'s setting, command and table, by the script that wrote it."""
    data = json.loads((BENCH_RESULTS / f"{stem}.json").read_text())
    if "ops_only" in data:  # bench_segmenter.py
        return segmenter_block(data)
    setting, command, table = _parts(data)
    return f"{setting}{provenance(data)}\n\n```bash\n{command.strip()}\n```\n\n{table}"


def _parts(data: dict) -> tuple[str, str, str]:
    """A result's setting, command and table, by the script that wrote it."""
    if "machine" in data:  # bench_train_step.py
        setting, command, table = train_step_setting(data), train_step_command(data), train_step_table(data["rows"])
    elif data["rows"] and "mode" in data["rows"][0]:  # bench_slide.py
        setting, table, command = data["meta"], slide_table(data["rows"]), _command("bench_slide.py", data["args"])
    else:  # bench_heads.py
        setting, table, command = data["meta"], heads_tables(data["rows"]), _command("bench_heads.py", data["args"])
    return setting, command, table
