"""The pvsched ABI as Python sees it: cffi parses pvsched_abi.h, nothing is copied by hand."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import cffi

ABI_HEADER = Path(__file__).with_name("pvsched_abi.h")
# The header as cffi's cdef reads it, made by this folder's Makefile (cdef.mk): at build time, because the
# sandboxed policy process cannot run a compiler.  No fallback to cc: one rule, the build output or an error.
ABI_CDEF = Path(__file__).parent / "build" / "pvsched_abi.cdef"

log = logging.getLogger("pyvmm.abi")


class AbiNotBuiltError(RuntimeError):
    """build/pvsched_abi.cdef is missing; the message says how to make it."""


def cdef() -> str:
    """The ABI header's declarations as cffi's cdef accepts them (the build output ABI_CDEF)."""
    checkout = Path(__file__).with_name("Makefile").exists()  # a wheel ships no Makefile
    try:
        text = ABI_CDEF.read_text()
    except FileNotFoundError:
        how = "run scripts/setup.sh" if checkout else "this installation lacks it: reinstall pyvmm"
        raise AbiNotBuiltError(f"pyvmm/abi/build/{ABI_CDEF.name} is missing: {how}") from None
    if checkout and ABI_CDEF.stat().st_mtime < ABI_HEADER.stat().st_mtime:
        log.warning("pyvmm: pyvmm/abi/build/%s is older than %s: run scripts/setup.sh", ABI_CDEF.name,
                    ABI_HEADER.name)
    return text


@functools.cache
def ffi() -> cffi.FFI:
    """One FFI per process with every ABI struct and enum declared."""
    f = cffi.FFI()
    f.cdef(cdef())
    return f


@functools.cache
def _lib():
    # ABI-mode "library" of the process itself: only used to read enum values.
    return ffi().dlopen(None)


class _Consts:
    """Attribute access to the header's enum constants: abi.C.PVSCHED_MAGIC."""

    def __getattr__(self, name: str) -> int:
        try:
            return getattr(_lib(), name)
        except (cffi.FFIError, AttributeError) as e:
            raise AttributeError(name) from e


C = _Consts()


def sizeof(ctype: str) -> int:
    """Size in bytes of an ABI type, e.g. sizeof('struct pvsched_slot')."""
    return ffi().sizeof(ctype)


def offsetof(ctype: str, *fields: str) -> int:
    """Offset of a (nested) field, e.g. offsetof('struct pvsched_slot', 'host', 'state')."""
    return ffi().offsetof(ctype, *fields)
