"""Smoke tests of the examples (their real runs are documented in the README)."""

import runpy
import sys

from examples import train_scenes


def test_train_scenes_quick_synthetic(tmp_path):
    results = train_scenes.main(["--quick", "--synthetic", "--no-progress", "--out", str(tmp_path)])
    assert set(results) == {"conv", "cac", "ssa", "proto"}
    for runs in results.values():
        assert 0.0 <= runs[0]["miou"] <= 1.0 and len(runs[0]["iou"]) == len(train_scenes.CLASSES)
    assert (tmp_path / "scenes-quick.json").exists() and (tmp_path / "scenes-quick.md").exists()


def test_scene_generator_labels_match_pixels():
    import numpy as np

    rng = np.random.default_rng(0)
    items, labels = train_scenes.synthetic_items(20, rng)
    images, targets = train_scenes.make_scenes(items, labels, 4, 64, rng)
    assert images.shape == (4, 3, 64, 64) and targets.shape == (4, 64, 64)
    assert 0 <= images.min() and images.max() <= 1
    assert targets.max() <= 10 and (targets > 0).any() and (targets == 0).any()


def test_demo_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--steps", "2", "--size", "32", "--batch", "2"])
    runpy.run_path("examples/demo.py", run_name="__main__")
    out = capsys.readouterr().out
    for name in ("Conv2d (baseline)", "ContextAwareClassifier", "SSAClassifier", "PrototypeClassifier"):
        assert f"[{name}] head logits" in out
