"""The BPF policies this installation ships: one `<name>.bpf.o` per `<name>.bpf.c` in this folder.

A policy is chosen by name (`pyvmm boot --policy-program NAME`), never by path: the policy process loads
only objects from its own package's build output, which the package build made.
"""

from __future__ import annotations

import re
from pathlib import Path

from pyvmm.common.artifacts import BuildError

__all__ = ["DEFAULT", "ProgramError", "available", "object_path"]

DEFAULT = "pvsched"
BUILD_DIR = Path(__file__).resolve().parent / "build"
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


class ProgramError(BuildError):
    """An unknown or malformed policy name; the message lists the ones there are."""


def available() -> list[str]:
    """Names of the built policies, sorted."""
    return sorted(p.name.removesuffix(".bpf.o") for p in BUILD_DIR.glob("*.bpf.o"))


def object_path(name: str) -> Path:
    """The object of policy `name`; ProgramError naming the available ones if there is none."""
    have = available()
    if not isinstance(name, str) or not NAME.fullmatch(name) or name not in have:
        shown = ", ".join(have) or "none: run scripts/setup.sh"
        raise ProgramError(f"no BPF policy {str(name)[:40]!r} (policies: {shown})")
    return BUILD_DIR / f"{name}.bpf.o"
