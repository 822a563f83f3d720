"""Whether this process runs inside `pyvmm lab`, which says so in its environment."""

from __future__ import annotations

import os

# `pyvmm lab` exports this (=1) into the lab's shell before it runs pyvmm there.
IN_LAB_VAR = "PYVMM_IN_LAB"


def in_lab() -> bool:
    """True inside `pyvmm lab`: every guest instruction is emulated there, 10-50x slower than here."""
    return bool(os.environ.get(IN_LAB_VAR))
