"""A wheel that works: its build runs the Makefiles and ships the outputs; installed alone, `pyvmm boot` runs.

The wheel is built from a copy of the sources without any build/ folder (so nothing made earlier in this
checkout can stand in for the build), installed into a fresh venv that sees the system's dependencies but
not this checkout (run from / with -I), and booted with nothing but the venv on PATH: no make, no cc.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = runpy.run_path(str(ROOT / "pyvmm" / "common" / "artifacts.py"))["OUTPUTS"]
SHIPPED = sorted(f"pyvmm/{folder}/build/{name}" for folder, names in OUTPUTS.items() for name in names)
C_SOURCE_SUFFIXES = (".c", ".h", ".S", ".ld", ".mk")
# What a source copy leaves out: build outputs and caches of this checkout, and its git history.
LEFT_OUT = shutil.ignore_patterns("build", "dist", "__pycache__", "*.egg-info", ".git", ".pytest_cache",
                                  ".hypothesis", "bench-out", ".setup-stamp", "*.o", "*.so", "*.ko")


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The checkout's sources, without build outputs."""
    dst = tmp_path_factory.mktemp("src") / "pyvmm-pvsched"
    shutil.copytree(ROOT, dst, ignore=LEFT_OUT)
    return dst


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    """`pip wheel . --no-deps` of the source copy (pip's own index configuration, untouched)."""
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", ".", "--no-deps", "-w", str(out)], timeout=600,
         cwd=source_copy)
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_ships_the_build_outputs_and_no_build_inputs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in SHIPPED if p not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    # the headers read at run time (cffi cdefs of the native libraries' APIs, stat descriptions)
    assert {"pyvmm/device/guardian.h", "pyvmm/policy/backstop_loop.h", "pyvmm/policy/pvsched_policy.h"} <= names
    # No Makefile: its presence is how pyvmm tells a source checkout (run scripts/setup.sh) from an install.
    assert not [n for n in names if n.endswith("/Makefile")]
    assert not [n for n in names if n.endswith(("vmlinux.h", ".o")) and not n.endswith(".bpf.o")]
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl")  # machine code inside: a platform wheel


def test_sdist_carries_the_sources_and_no_build_outputs(source_copy, tmp_path):
    # setuptools as pyproject.toml requires it, next to (not into) this Python: the build's own backend
    st = tmp_path / "setuptools"
    _run([sys.executable, "-m", "pip", "install", "-q", "--target", str(st), "setuptools>=70.1"], timeout=300)
    out = tmp_path / "dist"
    p = _run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
             timeout=300, cwd=source_copy, env={**os.environ, "PYTHONPATH": str(st)})
    sdist = out / p.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
    sources = {str(f.relative_to(source_copy)) for f in (source_copy / "pyvmm").rglob("*")
               if f.is_file() and (f.suffix in C_SOURCE_SUFFIXES or f.name in ("Makefile", "Kbuild"))}
    assert sources and not sources - names, f"missing from the sdist: {sorted(sources - names)}"
    assert {"setup.py", "pyproject.toml", "MANIFEST.in", "pyvmm/common/artifacts.py", "scripts/setup.sh"} <= names
    assert not [n for n in names if "/build/" in n or n.endswith((".o", ".so", ".elf", ".cdef"))]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; the system's packages give the dependencies offline."""
    v = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(v)], timeout=120, cwd="/")
    _run([str(v / "bin" / "python"), "-I", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         timeout=300, cwd="/")
    return v


def test_installed_package_is_the_wheel_not_this_checkout(venv):
    code = ("import pyvmm, pyvmm.abi as a; from pyvmm.common import artifacts as r; "
            "print(pyvmm.__file__); print(a.ffi().sizeof('struct pvsched_slot')); "
            "print(*(r.ensure_built(c) for c in r.COMPONENTS))")
    p = _run([str(venv / "bin" / "python"), "-I", "-c", code], timeout=60, cwd="/")
    pkg_file, slot_size, built = p.stdout.splitlines()
    site = Path(pkg_file).parent.parent
    assert site.is_relative_to(venv), pkg_file
    assert int(slot_size) > 0
    assert all(Path(b).is_relative_to(site) for b in built.split()), built


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/dev/kvm", os.R_OK | os.W_OK),
                    reason="pyvmm boot needs root and /dev/kvm")
def test_installed_wheel_boots_without_a_compiler(venv):
    env = {"PATH": str(venv / "bin"), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    for tool in ("cc", "gcc", "clang", "make"):  # the run time must not need them: PATH has only the venv
        assert shutil.which(tool, path=env["PATH"]) is None
    p = subprocess.run([str(venv / "bin" / "pyvmm"), "boot", "--cmdline", "duration=1 workload=idle",
                        "--no-console-input", "--cpus", "1"],
                       capture_output=True, text=True, timeout=120, cwd="/", env=env, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "pvsched: active" in out, out[-4000:]  # the guest negotiated with the device, the BPF policy loaded
    assert "policy loaded" in out, out[-4000:]
    # and it lived to the end (a newer trio than this checkout's once killed it at its first registration)
    assert "policy process" not in out or " died " not in out, out[-4000:]
