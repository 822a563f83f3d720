"""`pyvmm bench` and `pyvmm lab`: entry points that `pyvmm boot` does not import.

A VMM is the `pyvmm boot` process for its whole life; the bench's and the lab's modules would sit in its
resident memory unused.  pyvmm.cli.main imports this module only to run one of these commands.
"""

from __future__ import annotations

from pyvmm.bench.run import main as bench_main
from pyvmm.lab import main as lab_main


def bench(argv: list[str]) -> int:
    """Run `pyvmm bench` with these arguments."""
    return bench_main(argv)


def lab(argv: list[str]) -> int:
    """Run `pyvmm lab` with these arguments."""
    return lab_main(argv)
