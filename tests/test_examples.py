"""Smoke tests of the examples (their real runs are documented in the README)."""

import runpy
import sys


def test_demo_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--steps", "2", "--size", "32", "--batch", "2"])
    runpy.run_path("examples/demo.py", run_name="__main__")
    out = capsys.readouterr().out
    for name in ("Conv2d (baseline)", "ContextAwareClassifier", "SSAClassifier", "PrototypeClassifier"):
        assert f"[{name}] head logits" in out
