"""Benchmark scripts (run as files: bench/bench_*.py) and their shared helpers (bench.common)."""
