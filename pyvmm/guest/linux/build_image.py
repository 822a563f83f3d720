"""Build the Linux test image: the Debian kernel, the pvsched module built against it, and an initramfs.

The initramfs (cpio newc, gzip) holds busybox-static, cyclictest and chrt
(with the shared libraries ldd names), pvsched.ko and init.sh as /init.
Everything lands in the gitignored build/ folder next to this file, one
subfolder per kernel flavor; each step is skipped when its output is newer
than its inputs.

    python -m pyvmm.guest.linux.build_image [--flavor cloud|cloud-6.12|all] [--if-needed]
"""

from __future__ import annotations

import argparse
import errno
import gzip
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pyvmm.guest.linux import kernel

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PKG = HERE.parents[1]  # the pyvmm package
BUILD_DIR = kernel.BUILD_DIR
MODULE_SOURCES = [HERE / "pvsched.c", HERE / "Kbuild"]
MODULE_HEADERS = [PKG / "abi" / "pvsched_abi.h", PKG / "guest" / "common" / "pvsched_guest.h"]
INIT_SCRIPT = HERE / "init.sh"
BUSYBOX = Path("/bin/busybox")
# Host programs copied with their libraries (busybox has no chrt).
HOST_PROGRAMS = [Path("/usr/bin/cyclictest"), Path("/usr/bin/chrt")]


class ImageBuildError(RuntimeError):
    """Something the image needs is missing or failed to build."""


@dataclass(frozen=True)
class Image:
    """A bootable Linux test image."""

    flavor: str
    kernel: Path  # bzImage
    initrd: Path  # gzip'd cpio
    module: Path  # pvsched.ko inside the initrd, for reference
    release: str  # uname -r of the kernel


def _newer(out: Path, inputs: list[Path]) -> bool:
    """True when out exists and is at least as new as every input."""
    if not out.exists():
        return False
    t = out.stat().st_mtime
    return all(p.stat().st_mtime <= t for p in inputs)


def build_module(flavor: str = "cloud") -> Path:
    """Build pvsched.ko against flavor's current Debian headers; return its path."""
    flavor = kernel.canonical_flavor(flavor)
    kdir = kernel.fetch_headers(flavor)
    out_dir = BUILD_DIR / "module" / flavor
    ko = out_dir / "pvsched.ko"
    stamp = out_dir / "kdir"
    # Rebuild when sources change or the headers moved to a new release.
    if _newer(ko, MODULE_SOURCES + MODULE_HEADERS) and stamp.exists() and stamp.read_text() == str(kdir):
        return ko
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in MODULE_SOURCES:  # Kbuild builds in M=; keep flavors apart
        shutil.copy2(src, out_dir / src.name)
    cmd = ["make", "-s", "-C", str(kdir), f"M={out_dir}", f"PVSCHED_PKG={PKG}"]
    if shutil.which("pahole") is None:
        cmd.append("CONFIG_DEBUG_INFO_BTF_MODULES=")  # module BTF needs pahole; the module works without
    log.info("building pvsched.ko for %s", kernel.kernel_release(kdir))
    r = subprocess.run([*cmd, "modules"], capture_output=True, text=True, check=False)
    if r.returncode != 0 or not ko.exists():
        raise ImageBuildError(f"building pvsched.ko against {kdir.name} failed:\n{r.stdout}{r.stderr}")
    if r.stderr.strip():
        log.warning("%s", r.stderr.strip())
    stamp.write_text(str(kdir))
    return ko


def _shared_libs(prog: Path) -> list[Path]:
    """Shared libraries prog loads (as ldd names them), the dynamic loader included."""
    r = subprocess.run(["ldd", str(prog)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return []  # static
    libs = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                libs.append(Path(parts[i + 1]))
        elif parts and parts[0].startswith("/"):
            libs.append(Path(parts[0]))
    return libs


class Cpio:
    """A minimal cpio "newc" writer: directories, files, symlinks and device nodes without root or mknod."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._names:
            return
        self._names.add(name)
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._out += b"\0" * (-len(self._out) % 4)
        self._out += data
        self._out += b"\0" * (-len(self._out) % 4)

    def dir(self, name: str) -> None:
        """Add a directory and its parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (parents created)."""
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def host_file(self, path: Path, name: str | None = None) -> None:
        """Copy a host file (symlinks followed), keeping its mode and, by default, its path."""
        self.file(name or str(path), path.read_bytes(), path.stat().st_mode & 0o777)

    def bytes(self) -> bytes:
        """The archive with its trailer."""
        self._entry("TRAILER!!!", 0)
        return bytes(self._out)


def build_initramfs(flavor: str = "cloud") -> Path:
    """Pack busybox, cyclictest, chrt, pvsched.ko and /init into flavor's initramfs; return its path."""
    flavor = kernel.canonical_flavor(flavor)
    ko = build_module(flavor)
    out = BUILD_DIR / "image" / flavor / "initramfs.cpio.gz"
    for p in [BUSYBOX, *HOST_PROGRAMS]:
        if not p.exists():
            raise ImageBuildError(f"{p} is missing (apt packages busybox-static, rt-tests, util-linux)")
    inputs = [ko, INIT_SCRIPT, BUSYBOX, *HOST_PROGRAMS, Path(__file__)]
    if _newer(out, inputs):
        return out
    c = Cpio()
    for d in ["dev", "proc", "sys", "tmp", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin", "lib/modules"]:
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.host_file(BUSYBOX, "bin/busybox")
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    c.file("lib/modules/pvsched.ko", ko.read_bytes())
    for prog in HOST_PROGRAMS:
        c.host_file(prog, f"usr/local/bin/{prog.name}")
        for lib in _shared_libs(prog):
            c.host_file(lib.resolve(), str(lib))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.bytes(), compresslevel=6, mtime=0))
    os.replace(tmp, out)
    return out


def build_image(flavor: str = "cloud") -> Image:
    """Kernel + initramfs (with the module) for flavor, built or fetched as needed."""
    flavor = kernel.canonical_flavor(flavor)
    try:
        bz = kernel.fetch_kernel(flavor)
        initrd = build_initramfs(flavor)
    except OSError as e:
        hint = (" (the checkout is read-only inside `pyvmm lab`: build the image before it, with"
                " `python -m pyvmm.guest.linux.build_image`)" if e.errno == errno.EROFS else "")
        raise ImageBuildError(f"{e.filename or 'the image'}: {e.strerror or e}{hint}") from None
    ko = BUILD_DIR / "module" / flavor / "pvsched.ko"
    release = kernel.kernel_release(kernel.fetch_headers(flavor))
    if not bz.name.endswith(release):
        raise ImageBuildError(f"kernel {bz.name} and headers {release} differ (archive updated mid-build? rerun)")
    return Image(flavor=flavor, kernel=bz, initrd=initrd, module=ko, release=release)


def main(argv: list[str] | None = None) -> int:
    """CLI: build the image(s) and print kernel and initrd paths."""
    ap = argparse.ArgumentParser(prog="python -m pyvmm.guest.linux.build_image", description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="cloud", help="cloud (6.1, default), cloud-6.12, or all")
    ap.add_argument("--if-needed", action="store_true", help="quiet unless something is (re)built (for setup.sh)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="build_image: %(message)s")
    flavors = list(kernel.FLAVORS) if args.flavor == "all" else [args.flavor]
    try:
        for flavor in flavors:
            img = build_image(flavor)
            if not args.if_needed:
                print(f"{img.flavor} {img.release}\n  kernel {img.kernel}\n  initrd {img.initrd}")
    except (kernel.KernelFetchError, ImageBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
