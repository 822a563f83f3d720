"""Benchmark and report tools; `pyvmm bench` runs pyvmm.bench.run.main."""
