"""Build outputs (test guest, BPF objects, native libraries, cffi cdefs): found, never built, at run time.

Each component keeps a Makefile in its own folder that writes into a `build/` subfolder.  In a source
checkout scripts/setup.sh runs them (an editable install does too); a wheel's build (setup.py) runs the
same Makefiles and ships the outputs at the same place in the package.  The VMM and the sandboxed policy
process only look for the outputs: running make as root at run time would run whatever Makefile sits in
the checkout, and the sandbox cannot exec anyway.  In a source checkout (the Makefile is there; a wheel
ships none) an output older than its C sources still runs, with one warning line.

setup.py and scripts/setup.sh read OUTPUTS from this file without importing pyvmm: it imports nothing of
pyvmm and needs no third-party module.
"""

from __future__ import annotations

import logging
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent  # the pyvmm package
ROOT = PKG.parent
SETUP = "scripts/setup.sh"



def _policies(folder: str) -> tuple[str, ...]:
    """One BPF object per `*.bpf.c` source in folder: a new policy is a new source file, nothing more."""
    return tuple(sorted(p.name.removesuffix(".c") + ".o" for p in (PKG / folder).glob("*.bpf.c")))


# Every build output the package ships: component folder (relative to the package, with its Makefile)
# -> file names in its build/ subfolder.  Anything else there (objects, vmlinux.h) stays out of a wheel.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "abi": ("pvsched_abi.cdef", "pvsched_features.json", "testguest_boot.cdef"),
    "policy": (*_policies("policy"), "pvsched_policy.cdef", "libpvsched_backstop.so", "backstop_loop.cdef",
               "libpvsched_actuator.so", "actuator_loop.cdef"),
    "device": ("libpvsched_guardian.so", "guardian.cdef"),
    "guest/testguest": ("testguest.elf",),
    "bench/bpf": ("runqlat.bpf.o", "floor.bpf.o", "runqlat.cdef"),
}

# The outputs looked up by name: component -> (folder, file name), both as in OUTPUTS.
COMPONENTS = {
    "testguest": ("guest/testguest", "testguest.elf"),
    "bpf": ("policy", "pvsched.bpf.o"),
    "policy_cdef": ("policy", "pvsched_policy.cdef"),
    "backstop": ("policy", "libpvsched_backstop.so"),
    "backstop_cdef": ("policy", "backstop_loop.cdef"),
    "actuator": ("policy", "libpvsched_actuator.so"),
    "actuator_cdef": ("policy", "actuator_loop.cdef"),
    "guardian": ("device", "libpvsched_guardian.so"),
    "guardian_cdef": ("device", "guardian.cdef"),
    "runqlat": ("bench/bpf", "runqlat.bpf.o"),
    "floor": ("bench/bpf", "floor.bpf.o"),
    "runqlat_cdef": ("bench/bpf", "runqlat.cdef"),
}
# What the Makefiles build from: the folder's C sources, plus the ABI header they all include.
SOURCE_SUFFIXES = (".c", ".h", ".S", ".ld")
SHARED_SOURCES = (PKG / "abi" / "pvsched_abi.h", PKG / "abi" / "testguest_boot.h", PKG / "abi" / "sched_syscalls.h")

log = logging.getLogger("pyvmm.artifacts")
_warned: set[str] = set()


class BuildError(RuntimeError):
    """A component's build output is missing; the message says how to make it."""


def _newest_source(src: Path) -> float:
    paths = [p for p in src.iterdir() if p.suffix in SOURCE_SUFFIXES or p.name == "Makefile"]
    # A shared header counts only for a folder whose Makefile names it: make rebuilds nothing else
    # when it changes, and a warning that setup cannot clear would stay for good.
    makefile = (src / "Makefile").read_text() if (src / "Makefile").exists() else ""
    shared = [p for p in SHARED_SOURCES if p.name in makefile]
    return max((p.stat().st_mtime for p in [*paths, *shared] if p.exists()), default=0.0)


def _newest_output(folder: str) -> float:
    """mtime of the folder's newest build output: a make run after the last source change rebuilt at least the
    outputs that depend on it, so this is newer than that change (an unrelated output may rightly stay older)."""
    build = PKG / folder / "build"
    return max((p.stat().st_mtime for p in (build / n for n in OUTPUTS.get(folder, ())) if p.exists()), default=0.0)


def _shown(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def ensure_built(component: str, quiet: bool = False) -> Path:
    """Path of a component's output; BuildError if it is missing (in a checkout, warns once if its folder's
    sources changed after its last build)."""
    folder, name = COMPONENTS[component]
    src = PKG / folder
    target = src / "build" / name
    checkout = (src / "Makefile").exists()
    if not target.exists():
        how = f"run {SETUP}" if checkout else "this installation lacks it: reinstall pyvmm (its build makes it)"
        raise BuildError(f"{component} is not built ({_shown(target)} is missing): {how}")
    if checkout and component not in _warned and _newest_output(folder) < _newest_source(src):
        _warned.add(component)
        if not quiet:
            log.warning("pyvmm: %s is older than its sources: run %s to rebuild it", _shown(target), SETUP)
    return target
