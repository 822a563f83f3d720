"""Benchmark and report tools; `pyvmm bench` runs tools.bench.main."""
