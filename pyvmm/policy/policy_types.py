"""The BPF policy's shared types (pvsched_policy.h) as Python sees them, read by cffi from the header itself."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import cffi

from pyvmm.common.artifacts import ensure_built

POLICY_HEADER = Path(__file__).with_name("pvsched_policy.h")

_STAT_RE = re.compile(r"^\s*PVSCHED_STAT_(\w+)\s*=\s*(\d+),\s*/\*\s*(.*?)\s*\*/", re.MULTILINE)


@functools.cache
def ffi() -> cffi.FFI:
    """One FFI with the ABI header and the policy header declared (the latter includes the former)."""
    f = cffi.FFI()
    # build/pvsched_policy.cdef, made by pyvmm/policy/Makefile: the sandboxed process cannot run a compiler
    f.cdef(ensure_built("policy_cdef", quiet=True).read_text())
    return f


@functools.cache
def consts():
    """Enum constants of both headers: consts().PVSCHED_STAT_NR."""
    return ffi().dlopen(None)


@functools.cache
def stat_descriptions() -> dict[str, str]:
    """Stat name (lower case, enum order) -> its one-line description, taken from the header comments."""
    text = POLICY_HEADER.read_text()
    found = sorted((int(i), name.lower(), desc) for name, i, desc in _STAT_RE.findall(text))
    return {name: desc for _, name, desc in found}


def enum_name(enum: str, value: int) -> str:
    """Short lower-case name of an enum value, e.g. enum_name('pvsched_reason', 4) -> 'halt'."""
    names = ffi().typeof(f"enum {enum}").elements
    full = names.get(value)
    if full is None:
        return str(value)
    prefix = {"pvsched_reason": "PVSCHED_REASON_", "pvsched_source": "PVSCHED_SRC_",
              "pvsched_host_state": "PVSCHED_STATE_"}.get(enum, "PVSCHED_")
    return full.removeprefix(prefix).lower()
