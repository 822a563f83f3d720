"""Build outputs (test guest, BPF objects, the guardian library): found, never built, at run time.

Each component keeps a Makefile in its own folder that writes into a `build/`
subfolder; scripts/setup.sh runs them.  The VMM and the sandboxed policy
process only look for the outputs: running make as root at run time would run
whatever Makefile sits in the checkout, and the sandbox cannot exec anyway.
An output older than its C sources still runs, with one warning line.
"""

from __future__ import annotations

import logging
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent  # the pyvmm package
ROOT = PKG.parent
SETUP = "scripts/setup.sh"

COMPONENTS = {
    "testguest": (PKG / "guest" / "testguest", "build/testguest.elf"),
    "bpf": (PKG / "policy", "build/pvsched.bpf.o"),
    "guardian": (PKG / "device", "build/libpvsched_guardian.so"),
}
# What the Makefiles build from: the folder's C sources, plus the ABI header they all include.
SOURCE_SUFFIXES = (".c", ".h", ".S", ".ld")
SHARED_SOURCES = (PKG / "abi" / "pvsched_abi.h",)

log = logging.getLogger("pyvmm.artifacts")
_warned: set[str] = set()


class BuildError(RuntimeError):
    """A component's build output is missing; the message says how to make it."""


def _newest_source(src: Path) -> float:
    paths = [p for p in src.iterdir() if p.suffix in SOURCE_SUFFIXES or p.name == "Makefile"]
    return max((p.stat().st_mtime for p in [*paths, *SHARED_SOURCES] if p.exists()), default=0.0)


def ensure_built(component: str, quiet: bool = False) -> Path:
    """Path of a component's main output; BuildError if it is missing (warns once if older than its sources)."""
    src, out = COMPONENTS[component]
    target = src / out
    if not target.exists():
        raise BuildError(f"{component} is not built ({target.relative_to(ROOT)} is missing): run {SETUP}")
    if component not in _warned and target.stat().st_mtime < _newest_source(src):
        _warned.add(component)
        if not quiet:
            log.warning("pyvmm: %s is older than its sources: run %s to rebuild it", target.relative_to(ROOT),
                        SETUP)
    return target
