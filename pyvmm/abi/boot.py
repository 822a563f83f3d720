"""The test guest's boot contract (testguest_boot.h) as Python sees it: cffi parses the header, nothing is copied.

Only the ELF loader of test guests needs it; the pvsched ABI proper is the package itself (pyvmm.abi).
"""

from __future__ import annotations

import functools
from pathlib import Path

import cffi

from pyvmm.abi import _build_output, _Consts

BOOT_HEADER = Path(__file__).with_name("testguest_boot.h")
# The header as cffi's cdef reads it, made by this folder's Makefile (cdef.mk) at build time.
BOOT_CDEF = Path(__file__).parent / "build" / "testguest_boot.cdef"


def cdef() -> str:
    """The boot header's declarations as cffi's cdef accepts them (the build output BOOT_CDEF)."""
    return _build_output(BOOT_CDEF, BOOT_HEADER)


@functools.cache
def ffi() -> cffi.FFI:
    """One FFI per process with struct pvsched_boot_info and enum pvsched_boot declared."""
    f = cffi.FFI()
    f.cdef(cdef())
    return f


@functools.cache
def _lib():
    # ABI-mode "library" of the process itself: only used to read enum values.
    return ffi().dlopen(None)


C = _Consts(_lib)  # boot.C.PVSCHED_BOOT_INFO_MAGIC
