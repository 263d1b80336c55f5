"""Benchmarks of adaptive_heads (run ``python benchmarks/bench_heads.py --help``)."""
