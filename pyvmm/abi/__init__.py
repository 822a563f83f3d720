"""The pvsched ABI as Python sees it: cffi parses pvsched_abi.h, nothing is copied by hand."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cffi

ABI_HEADER = Path(__file__).with_name("pvsched_abi.h")
# The header as cffi's cdef reads it, made by this folder's Makefile (cdef.mk): at build time, because the
# sandboxed policy process cannot run a compiler.  No fallback to cc: one rule, the build output or an error.
ABI_CDEF = Path(__file__).parent / "build" / "pvsched_abi.cdef"
# The header's feature list (PVSCHED_FEATURES), expanded by the preprocessor at build time.
FEATURES_JSON = Path(__file__).parent / "build" / "pvsched_features.json"

log = logging.getLogger("pyvmm.abi")


class AbiNotBuiltError(RuntimeError):
    """A build output of pyvmm/abi (a cdef, the feature list) is missing or stale; the message says how to make it."""


def _build_output(path: Path, header: Path = ABI_HEADER) -> str:
    """Text of one of this folder's build outputs; AbiNotBuiltError if it is missing, a warning if older than
    the header it is made from."""
    checkout = Path(__file__).with_name("Makefile").exists()  # a wheel ships no Makefile
    try:
        text = path.read_text()
    except FileNotFoundError:
        how = "run scripts/setup.sh" if checkout else "this installation lacks it: reinstall pyvmm"
        raise AbiNotBuiltError(f"pyvmm/abi/build/{path.name} is missing: {how}") from None
    if checkout and path.stat().st_mtime < header.stat().st_mtime:
        log.warning("pyvmm: pyvmm/abi/build/%s is older than %s: run scripts/setup.sh", path.name, header.name)
    return text


def cdef() -> str:
    """The ABI header's declarations as cffi's cdef accepts them (the build output ABI_CDEF)."""
    return _build_output(ABI_CDEF)


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
    """Attribute access to a header's enum constants through its ABI-mode library: abi.C.PVSCHED_MAGIC."""

    def __init__(self, lib) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):  # never a constant; and copy/pickle look these up before __init__ ran
            raise AttributeError(name)
        try:
            return getattr(self._lib(), name)
        except (cffi.FFIError, AttributeError) as e:
            raise AttributeError(name) from e


C = _Consts(_lib)


def enum_names(enum: str, prefix: str, ffi_: cffi.FFI | None = None) -> dict[int, str]:
    """A header enum as {value: name without `prefix`, lower case}, e.g. enum_names("pvsched_status",
    "PVSCHED_STATUS_") -> {0: "idle", ...}: the one source of every name table (ffi_: another header's FFI)."""
    return {v: n.removeprefix(prefix).lower() for v, n in (ffi_ or ffi()).typeof(f"enum {enum}").elements.items()
            if n.startswith(prefix)}


def sizeof(ctype: str) -> int:
    """Size in bytes of an ABI type, e.g. sizeof('struct pvsched_slot')."""
    return ffi().sizeof(ctype)


def offsetof(ctype: str, *fields: str) -> int:
    """Offset of a (nested) field, e.g. offsetof('struct pvsched_slot', 'host', 'state')."""
    return ffi().offsetof(ctype, *fields)


@dataclass(frozen=True)
class Feature:
    """One row of the header's feature list: PVSCHED_F_<NAME> = 1 << bit."""

    name: str  # lower case, as the CLI and the records spell it: "rt_waiter"
    bit: int
    offered: bool  # in the device's default offer
    doc: str

    @property
    def mask(self) -> int:
        """The feature's bit as a mask."""
        return 1 << self.bit


@functools.cache
def features() -> tuple[Feature, ...]:
    """The header's features in bit order; AbiNotBuiltError if the JSON is missing or disagrees with the enum."""
    rows = [r for r in json.loads(_build_output(FEATURES_JSON)) if r is not None]
    out = tuple(sorted((Feature(r["name"].lower(), int(r["bit"]), bool(r["offered"]), str(r["doc"])) for r in rows),
                       key=lambda f: f.bit))
    for f in out:
        if getattr(C, f"PVSCHED_F_{f.name.upper()}", None) != f.mask:
            raise AbiNotBuiltError(f"pyvmm/abi/build/{FEATURES_JSON.name} disagrees with the header "
                                   f"({f.name}): run scripts/setup.sh")
    return out


def feature_names(bits: int) -> list[str]:
    """Names of the feature bits in `bits`, in bit order (bits this header does not define as hex)."""
    names = [f.name for f in features() if bits & f.mask]
    unknown = bits & ~C.PVSCHED_F_ALL
    return names + ([f"unknown:{unknown:#x}"] if unknown else [])


def parse_features(text: str) -> int:
    """Feature bits from HEX (`1f`, `0x1f`) or comma-separated names (`rt_waiter,wake_hint`); ValueError if bad."""
    text = text.strip()
    by_name = {f.name: f.mask for f in features()}
    if text and all(part.strip().lower() in by_name for part in text.split(",")):
        bits = 0
        for part in text.split(","):
            bits |= by_name[part.strip().lower()]
        return bits
    try:
        return int(text, 16)
    except ValueError:
        raise ValueError(f"{text!r} is neither hex nor feature names ({', '.join(by_name)})") from None
