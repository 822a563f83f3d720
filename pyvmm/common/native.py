"""A component's native shared library from Python: cffi in ABI mode (dlopen), no compiler at run time.

The library's header is its API.  The component's Makefile turns the header into a cffi cdef at build
time (pyvmm/abi/cdef.mk), because the sandboxed policy process cannot run a compiler; both are build
outputs found through artifacts.ensure_built: COMPONENTS[name] is the library, COMPONENTS[name + "_cdef"]
its cdef.
"""

from __future__ import annotations

from typing import Any

import cffi

from pyvmm.common.artifacts import BuildError, ensure_built


class NativeError(OSError):
    """A component's shared library is not built or would not load; the message says which."""


def ffi(component: str, *includes: cffi.FFI) -> cffi.FFI:
    """A new FFI with `includes` (FFIs whose types the header uses) and then the component's cdef declared."""
    f = cffi.FFI()
    for other in includes:
        f.include(other)
    f.cdef(ensure_built(f"{component}_cdef", quiet=True).read_text())
    return f


def dlopen(component: str, f: cffi.FFI) -> Any:
    """The component's shared library opened through `f`; NativeError naming what is missing or failed."""
    try:
        path = ensure_built(component, quiet=True)
    except BuildError as e:
        raise NativeError(str(e)) from None
    try:
        return f.dlopen(str(path))
    except OSError as e:
        raise NativeError(f"cannot load {path.name}: {e}") from None
