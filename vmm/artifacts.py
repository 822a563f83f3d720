"""Build outputs (test guest, BPF objects, the guardian library) made from source on first use.

Each component keeps a Makefile in its own folder that writes into a
`build/` subfolder; this module runs `make` when an output is missing or
older than its sources, so `pip install -e . && pyvmm boot` works.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMPONENTS = {
    "testguest": (ROOT / "guest_image" / "testguest", "build/testguest.elf"),
    "bpf": (ROOT / "bpf", "build/pvsched.bpf.o"),
    "guardian": (ROOT / "pvsched_device", "build/libpvsched_guardian.so"),
}


class BuildError(RuntimeError):
    """A component failed to build; the message names it and the make output tail."""


def ensure_built(component: str, quiet: bool = False) -> Path:
    """Path of a component's main output, running its Makefile first if it is stale."""
    src, out = COMPONENTS[component]
    target = src / out
    # make decides staleness itself: cheap when up to date.
    q = subprocess.run(["make", "-q", "-C", str(src)], capture_output=True, check=False)
    if q.returncode != 0 or not target.exists():
        if not quiet:
            print(f"pyvmm: building {component} ...", file=sys.stderr)
        r = subprocess.run(["make", "-C", str(src)], capture_output=True, text=True, check=False)
        if r.returncode != 0 or not target.exists():
            tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
            raise BuildError(f"building {component} failed: " + " | ".join(tail))
    return target
