"""Smoke test of the benchmark script (the speed and memory targets live in benchmarks/, not in tests)."""

import json

import pytest
import torch

from benchmarks import report


def test_bench_quick_runs_and_writes_results(tmp_path):
    pytest.importorskip("torch")
    from benchmarks import bench_heads

    out = tmp_path / "quick.json"
    rows = bench_heads.main(
        [
            "--quick",
            "--sizes",
            "64",
            "--device",
            "cpu",
            "--no-progress",
            "--no-plot",
            "--out",
            str(out),
            "--loop-reference",
        ]
    )
    heads = {r["head"] for r in rows}
    assert heads == {"conv", "conv+plainCE", "cac", "ssa", "proto"}
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 5 and "meta" in data
    for row in data["rows"]:
        assert row["infer_s"] > 0 and row["train_s"] > 0
        assert row["infer_time_ratio"] > 0
        if row["head"] in ("cac", "ssa", "proto"):
            assert row["loop_train_s"] > 0 and row["speedup_vs_loop"] > 0
            assert row["train_ops"] < row["loop_ops"] and row["train_syncs"] < row["loop_syncs"]
    assert "| 64 | 4 | 19 | 64 | cac |" in report.heads_table(rows)
    assert "| 64 | 4 | 19 | 64 | proto |" in report.loop_table(rows)
    assert bench_heads.main(["--render", str(out)]) == data["rows"]  # re-render without measuring


def test_bench_model_mode_quick(tmp_path):
    from benchmarks import bench_heads

    rows = bench_heads.main(
        [
            "--quick",
            "--model",
            "--sizes",
            "64",
            "--device",
            "cpu",
            "--no-progress",
            "--no-plot",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert {r["head"] for r in rows} == {"conv", "cac", "ssa", "proto"}
    assert all(r["train_s"] > 0 for r in rows)
    training_only = [{k: v for k, v in r.items() if not k.startswith("infer")} for r in rows]
    header = report.heads_table(training_only).splitlines()[0]
    assert "train ms" in header and "infer" not in header  # unmeasured columns are left out


def test_count_ops_counts_cross_device_copies_as_syncs():
    from benchmarks.measure import count_ops

    x = torch.randn(3, device="meta")
    host = torch.randn(3)
    assert count_ops(lambda: x + 1)["syncs"] == 0
    assert count_ops(lambda: x + host.to("meta"))["syncs"] == 1
    assert count_ops(lambda: x.copy_(host))["syncs"] == 1


def test_bench_slide_quick(tmp_path):
    from benchmarks import bench_slide

    out = tmp_path / "slide.json"
    args = ["--quick", "--size", "96", "--crop", "48", "--stride", "32", "--out", str(out)]
    rows = bench_slide.main(args)
    assert [r["mode"] for r in rows] == ["whole image", "slide, tile context", "slide, image context"]
    assert [r["tiles"] for r in rows] == [1, 9, 9] and all(r["seconds"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows
    assert "| slide, image context | 9 |" in report.slide_table(rows)


def test_interleaved_median_times_runs_round_robin_and_takes_medians():
    from benchmarks.measure import interleaved_median_times

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("conv", "cac", "ssa")}
    times = interleaved_median_times(fns, torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["conv", "cac", "ssa"] + ["conv", "cac", "ssa"] * 3  # warm-up, then one call of each per round
    assert set(times) == set(fns) and all(t >= 0 for t in times.values())


def test_bench_float32_and_bf16_side_by_side(tmp_path):
    from benchmarks import bench_heads

    rows = bench_heads.main(
        ["--quick", "--sizes", "64", "--heads", "cac", "--no-inference", "--dtype", "fp32", "bf16",
         "--no-progress", "--no-plot", "--out", str(tmp_path / "d.json")]
    )  # fmt: skip
    assert sorted({(r["dtype"], r["head"]) for r in rows}) == [
        ("bf16", "cac"), ("bf16", "conv"), ("bf16", "conv+plainCE"),
        ("fp32", "cac"), ("fp32", "conv"), ("fp32", "conv+plainCE"),
    ]  # fmt: skip
    table = report.heads_table(rows)
    assert "| dtype |" in table and "| 64 | 4 | 19 | 64 | bf16 | cac |" in table
    assert all(r["train_time_ratio"] > 0 for r in rows)  # each dtype against its own conv


def test_bench_train_step_quick(tmp_path):
    from benchmarks import bench_train_step

    out = tmp_path / "step.json"
    data = bench_train_step.main(["--sizes", "64", "--channels", "16", "--classes", "5", "--out", str(out)])
    rows = data["rows"]
    assert [r["head"] for r in rows] == ["conv", "cac", "ssa", "proto"]
    assert all(r["train_s"] > 0 and len(r["train_s_all"]) == 1 for r in rows)
    assert rows[0]["train_time_ratio"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["args"] == ["--sizes", "64", "--channels", "16",
                                                                               "--classes", "5"]  # fmt: skip
    assert saved["machine"]["threads"] == torch.get_num_threads() and saved["machine"]["cpus"] >= 1
    text = report.train_step_setting(saved) + report.train_step_table(saved["rows"])
    assert "| 64 | conv + `F.cross_entropy` |" in text and "| 64 | ssa |" in text and "threads" in text
    if rows[0]["load_average_before"] is not None:  # POSIX: how busy the machine was is on record
        assert "load average" in text
    if rows[0]["train_peak_bytes"] is not None:  # Linux: peak memory, above what was live before the step
        # >= 0: in a long test process freed memory is reused, so a tiny step may need nothing above the start
        assert all(r["train_peak_bytes"] >= 0 for r in rows) and "train_extra_mib" in rows[1]
