"""The pvsched ABI as Python sees it: cffi parses pvsched_abi.h, nothing is copied by hand."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import cffi

ABI_HEADER = Path(__file__).with_name("pvsched_abi.h")

_PROLOGUE = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
"""


def preprocess(header: Path = ABI_HEADER) -> str:
    """Return the header's declarations as cffi's cdef accepts them (no asserts, no directives)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) found: needed to preprocess pvsched_abi.h")
    out = subprocess.run(
        [cc, "-E", "-P", "-DPVSCHED_ABI_NO_ASSERTS", "-x", "c", "-"],
        input=_PROLOGUE + f'#include "{header}"\n',
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


@functools.cache
def ffi() -> cffi.FFI:
    """One FFI per process with every ABI struct and enum declared."""
    f = cffi.FFI()
    f.cdef(preprocess())
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
