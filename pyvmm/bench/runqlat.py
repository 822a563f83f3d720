"""Host wake-to-run latency of given threads (the vCPU threads), measured by a small CO-RE BPF program.

The benchmark needs it to show *why* guest latency changes: a boosted vCPU
thread waits less on the host runqueue after its timer wakes it.
pyvmm/bench/bpf/runqlat.bpf.c does the counting; this module loads it through the one libbpf
binding (pyvmm.common.libbpf) and reads its histograms.  The object and runqlat.h's cdef are build
outputs (pyvmm/bench/bpf/Makefile, run by scripts/setup.sh and by the package build), never made at
run time.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Self

import cffi

from pyvmm.common import libbpf
from pyvmm.common.artifacts import BuildError, ensure_built
from pyvmm.common.libbpf import LibbpfError, check

BPF_DIR = Path(__file__).resolve().parent / "bpf"
HEADER = BPF_DIR / "runqlat.h"
OBJECT = BPF_DIR / "build" / "runqlat.bpf.o"

class RunqlatError(RuntimeError):
    """The runqueue-latency probe is not built, or could not be loaded or attached; the message says which."""


def _built(component: str) -> Path:
    try:
        return ensure_built(component)
    except BuildError as e:
        raise RunqlatError(str(e)) from None


def object_path() -> Path:
    """Path of the built runqlat.bpf.o; RunqlatError saying how to make it if it is missing."""
    return _built("runqlat")


build = object_path  # the earlier name, which pyvmm/bench/run.py's preflight calls


@functools.cache
def ffi() -> cffi.FFI:
    """One FFI with runqlat.h's types and constants; the libbpf calls go through pyvmm.common.libbpf."""
    f = cffi.FFI()
    f.cdef(_built("runqlat_cdef").read_text())
    return f


@functools.cache
def _consts():
    # ABI-mode "library" of the process itself: only used to read runqlat.h's enum values.
    return ffi().dlopen(None)


def _libbpf():
    try:
        return libbpf.lib()
    except LibbpfError as e:
        raise RunqlatError(e.strerror) from None


def const(name: str) -> int:
    """Value of an enum constant of runqlat.h, e.g. const('RUNQLAT_LINEAR_US')."""
    return getattr(_consts(), name)


def bucket_bounds_us(index: int) -> tuple[float, float]:
    """[low, high) microseconds of histogram bucket `index`: 1 us wide below RUNQLAT_LINEAR_US, then 1/64 of
    a power of two (the inverse of bucket_of in runqlat.bpf.c)."""
    linear = const("RUNQLAT_LINEAR_US")
    if index < linear:
        return float(index), float(index + 1)
    subs, sub_bits = const("RUNQLAT_SUBS"), const("RUNQLAT_SUB_BITS")
    k = index - linear
    e = const("RUNQLAT_LINEAR_BITS") + k // subs
    lo = (subs + k % subs) << (e - sub_bits)
    return float(lo), float(lo + (1 << (e - sub_bits)))


def summarize(count: int, sum_ns: int, max_ns: int, buckets: list[int]) -> dict:
    """Turn a (summed) histogram into {"count","avg","p50","p99","max"} in microseconds (None when empty)."""
    if count <= 0 or not any(buckets):
        return {"count": 0, "avg": None, "p50": None, "p99": None, "max": None}
    total = sum(buckets)
    max_us = round(max_ns / 1000.0, 1)  # percentiles never exceed the max as reported

    def pct(q: float) -> float:
        need = q * total
        seen = 0
        for i, n in enumerate(buckets):
            seen += n
            if n and seen >= need:
                lo, hi = bucket_bounds_us(i)
                return min(hi if hi - lo > 1 else lo, max_us)
        return max_us

    return {"count": count, "avg": round(sum_ns / count / 1000.0, 2), "p50": pct(0.50),
            "p99": pct(0.99), "max": max_us}


class Runqlat:
    """The loaded and attached probe; use as a context manager, `track(tids)`, `reset()`, `read()`."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise RunqlatError("runqlat needs root (CAP_BPF, CAP_PERFMON)")
        object_path()
        self._f = ffi()
        self._lib = _libbpf()
        self._progs: dict = {}
        self._obj = None
        try:
            self._open_and_attach()
        except LibbpfError as e:
            self.close()
            raise RunqlatError(e.strerror) from None
        except BaseException:
            self.close()
            raise

    def _open_and_attach(self) -> None:
        self._obj, self._progs = libbpf.open_load_attach(OBJECT)
        self._fd = {n: self._map_fd(n) for n in ("tids", "start", "hists")}
        self._ncpu = check(self._lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")

    def _map_fd(self, name: str) -> int:
        m = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if m == libbpf.ffi().NULL:
            raise RunqlatError(f"map {name} missing from {OBJECT.name}")
        return self._lib.bpf_map__fd(m)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clear(self, name: str) -> None:
        fd = self._fd[name]
        key = self._f.new("__u32 *")
        nxt = self._f.new("__u32 *")
        keys = []
        prev = self._f.NULL
        while self._lib.bpf_map_get_next_key(fd, prev, nxt) == 0:
            keys.append(nxt[0])
            key[0] = nxt[0]
            prev = key
        for k in keys:
            key[0] = k
            self._lib.bpf_map_delete_elem(fd, key)

    def track(self, tids: list[int]) -> None:
        """Start measuring these thread IDs (in addition to those already tracked)."""
        key = self._f.new("__u32 *")
        one = self._f.new("__u8 *", 1)
        for t in tids:
            key[0] = t
            if self._lib.bpf_map_update_elem(self._fd["tids"], key, one, 0):
                raise RunqlatError(f"cannot track tid {t} (more than RUNQLAT_MAX_TIDS?)")

    def reset(self) -> None:
        """Forget tracked threads and zero the histograms (between benchmark runs)."""
        self._clear("tids")
        self._clear("start")
        zero = self._f.new(f"struct runqlat_hist[{self._ncpu}]")
        key = self._f.new("__u32 *")
        for k in range(const("RUNQLAT_NR_KINDS")):
            key[0] = k
            self._lib.bpf_map_update_elem(self._fd["hists"], key, zero, 0)

    def read_raw(self) -> dict[str, tuple[int, int, int, list[int]]]:
        """Per kind ("wakeup", "preempt"): (count, sum_ns, max_ns, buckets) added up over CPUs."""
        vals = self._f.new(f"struct runqlat_hist[{self._ncpu}]")
        key = self._f.new("__u32 *")
        out = {}
        for k, name in ((const("RUNQLAT_WAKEUP"), "wakeup"), (const("RUNQLAT_PREEMPT"), "preempt")):
            key[0] = k
            if self._lib.bpf_map_lookup_elem(self._fd["hists"], key, vals):
                raise RunqlatError("reading the runqlat histogram failed")
            nb = const("RUNQLAT_NR_BUCKETS")
            buckets = [0] * nb
            count = sum_ns = max_ns = 0
            for c in range(self._ncpu):
                h = vals[c]
                count += h.count
                sum_ns += h.sum_ns
                max_ns = max(max_ns, h.max_ns)
                row = self._f.unpack(h.buckets, nb)
                buckets = [a + b for a, b in zip(buckets, row)]
            out[name] = (count, sum_ns, max_ns, buckets)
        return out

    def read(self) -> dict:
        """Summaries in microseconds: {"wakeup": {...}, "preempt": {...}, "all": {...}} (see summarize)."""
        raw = self.read_raw()
        res = {name: summarize(*v) for name, v in raw.items()}
        w, p = raw["wakeup"], raw["preempt"]
        res["all"] = summarize(w[0] + p[0], w[1] + p[1], max(w[2], p[2]), [a + b for a, b in zip(w[3], p[3])])
        return res

    def close(self) -> None:
        """Detach every program and free the object; idempotent."""
        libbpf.close_object(self._obj, self._progs)
        self._obj = None
