"""Fetch the current Debian kernel (and its build headers) for the Linux guest.

The version is never pinned: each flavor names a Debian *meta* package
(e.g. linux-image-cloud-amd64), whose candidate version apt resolves to the
concrete package of the day.  Packages are fetched with `apt-get download`
(nothing is installed on the host) and unpacked with dpkg-deb into a
gitignored cache next to this file, so a second call is quick.

    python -m pyvmm.guest.linux.kernel [--flavor cloud|cloud-6.12] [--headers]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)



def _build_dir() -> Path:
    """Where kernels, headers, the module and images go: build/ next to the sources in a checkout (its
    Makefile is there), else the user's cache; an installed package's folder is no place to write."""
    here = Path(__file__).resolve().parent
    if (here / "Makefile").exists():
        return here / "build"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "pyvmm" / "linux"


BUILD_DIR = _build_dir()

# flavor -> (image meta package, headers meta package).  "cloud" is the
# distribution's default cloud kernel (6.1 on bookworm); "cloud-6.12" is the
# 6.12 line bookworm ships through its security suite (no backports needed).
FLAVORS: dict[str, tuple[str, str]] = {
    "cloud": ("linux-image-cloud-amd64", "linux-headers-cloud-amd64"),
    "cloud-6.12": ("linux-image-6.12-cloud-amd64", "linux-headers-6.12-cloud-amd64"),
    "generic": ("linux-image-amd64", "linux-headers-amd64"),
}
ALIASES = {"cloud-6.1": "cloud", "6.1": "cloud", "6.12": "cloud-6.12"}


class KernelFetchError(RuntimeError):
    """A kernel or header package could not be resolved, downloaded or unpacked."""


@dataclass(frozen=True)
class Package:
    """A concrete Debian package at one version."""

    name: str
    version: str


def canonical_flavor(flavor: str) -> str:
    """Map an alias (6.1, 6.12, cloud-6.1) to a key of FLAVORS; reject unknown names."""
    flavor = ALIASES.get(flavor, flavor)
    if flavor not in FLAVORS:
        known = ", ".join(sorted([*FLAVORS, *ALIASES]))
        raise KernelFetchError(f"unknown kernel flavor {flavor!r} (known: {known})")
    return flavor


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


_updated = False


def _apt_update_once() -> None:
    # Fresh or stale package lists are the usual reason a lookup or download
    # fails; refresh them at most once per process.
    global _updated
    if _updated:
        return
    _updated = True
    log.info("apt-get update (package lists missing or stale)")
    r = _run(["apt-get", "update", "-q"])
    if r.returncode != 0:
        log.warning("apt-get update failed: %s", r.stderr.strip().splitlines()[-1:] or r.returncode)


def _show(names: list[str]) -> dict[str, dict[str, str]]:
    """Fields of the candidate version of each package (one apt-cache call for all: each call loads apt's cache)."""
    for attempt in range(2):
        r = _run(["apt-cache", "show", "--no-all-versions", *names])
        found: dict[str, dict[str, str]] = {}
        for stanza in r.stdout.split("\n\n"):
            fields: dict[str, str] = {}
            key = ""
            for line in stanza.splitlines():
                if line[:1].isspace() and key:
                    fields[key] += " " + line.strip()
                elif ":" in line:
                    key, _, value = line.partition(":")
                    fields[key] = value.strip()
            if "Package" in fields:
                found.setdefault(fields["Package"], fields)
        if all(n in found for n in names):
            return found
        if attempt == 0:
            _apt_update_once()
    missing = ", ".join(n for n in names if n not in found)
    raise KernelFetchError(f"apt knows no package {missing} (is the Debian archive in the apt sources?)")


def _depends(fields: dict[str, str]) -> list[str]:
    """Package names of Depends, first alternative of each, without versions."""
    names = []
    for dep in fields.get("Depends", "").split(","):
        first = dep.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def _apt_fingerprint() -> str:
    # Resolution only changes when the package lists or sources change.
    parts = []
    for p in [Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")]:
        try:
            parts.append(str(p.stat().st_mtime_ns))
        except OSError:
            parts.append("-")
    return ":".join(parts)


def resolve(meta: str, prefixes: tuple[str, ...]) -> list[Package]:
    """The concrete packages a meta package pulls in, following Depends whose name has one of `prefixes`."""
    cache_file = BUILD_DIR / "resolved.json"
    key = f"{meta} {' '.join(prefixes)}"
    fingerprint = _apt_fingerprint()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if hit and hit.get("apt") == fingerprint:
        return [Package(n, v) for n, v in hit["packages"]]

    seen: dict[str, Package] = {}
    level = [meta]
    while level:
        shown = _show(level)
        nxt = []
        for name in level:
            seen[name] = Package(name, shown[name]["Version"])
            nxt += [d for d in _depends(shown[name]) if d.startswith(prefixes) and d not in seen and d not in nxt]
        level = nxt
    # The meta package itself carries no files.
    pkgs = [p for n, p in seen.items() if n != meta]
    cache[key] = {"apt": fingerprint, "packages": [[p.name, p.version] for p in pkgs]}
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, cache_file)
    return pkgs


def _cached_deb(pkg: Package, dest: Path) -> Path | None:
    for deb in dest.glob(f"{pkg.name}_*.deb"):
        r = _run(["dpkg-deb", "-f", str(deb), "Version"])
        if r.returncode == 0 and r.stdout.strip() == pkg.version:
            return deb
    return None


def download(pkg: Package, dest: Path) -> Path:
    """`apt-get download` one package at its exact version into dest (reused when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    deb = _cached_deb(pkg, dest)
    if deb:
        return deb
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg.name}={pkg.version}"]
    for attempt in range(2):
        log.info("downloading %s %s", pkg.name, pkg.version)
        r = _run(cmd, cwd=dest)
        deb = _cached_deb(pkg, dest)
        if r.returncode == 0 and deb:
            return deb
        if attempt == 0:
            _apt_update_once()
    msg = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    raise KernelFetchError(f"apt-get download {pkg.name}={pkg.version} failed: {msg}")


def _extract_boot(deb: Path, dest: Path) -> None:
    # Only ./boot/ is needed (the modules are ~100 MB we never use): stream
    # the data tarball and keep just those members.
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name.startswith("boot/") and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                (dest / Path(name).name).write_bytes(f.read())
    proc.stdout.close()
    if proc.wait() != 0:
        raise KernelFetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed")


def _newest_cached(parent: Path, pattern: str) -> Path | None:
    found = sorted(parent.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _publish(tmp: Path, out: Path) -> None:
    """Rename a finished tmp tree to out atomically; if a concurrent caller got there first, keep theirs."""
    tmp.chmod(0o755)
    try:
        os.replace(tmp, out)
    except OSError:
        if not out.is_dir():
            raise


def _fetch_image(meta: str, cache: Path, image_glob: str, unpack) -> Path:
    """The vmlinuz of meta's current kernel package, unpacked under cache by unpack(deb, dest) on first use.

    Offline (the meta package cannot be resolved), the newest tree already unpacked is used."""
    try:
        (pkg,) = resolve(meta, ("linux-image-",))
    except KernelFetchError:
        cached = _newest_cached(cache, f"*/{image_glob}")
        if cached:
            log.warning("cannot resolve %s; using cached %s", meta, cached)
            return cached
        raise
    out = cache / f"{pkg.name}_{pkg.version}"
    found = sorted(out.glob(image_glob))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        deb = download(pkg, tmp / "deb")
        unpack(deb, tmp)
        if not list(tmp.glob(image_glob)):
            raise KernelFetchError(f"{deb.name} holds no boot/vmlinuz-*")
        shutil.rmtree(tmp / "deb")  # the unpacked tree is all we keep
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return min(out.glob(image_glob))


def fetch_kernel(flavor: str = "cloud") -> Path:
    """Path of the current Debian kernel's vmlinuz (a bzImage) for flavor, downloaded and cached on first use."""
    flavor = canonical_flavor(flavor)
    return _fetch_image(FLAVORS[flavor][0], BUILD_DIR / "kernel" / flavor, "vmlinuz-*", _extract_boot)


def _unpack_with_modules(deb: Path, dest: Path) -> None:
    log.info("unpacking %s", deb.name)
    r = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if r.returncode != 0:
        raise KernelFetchError(f"dpkg-deb -x {deb.name}: {r.stderr.strip()}")
    images = sorted(dest.glob("boot/vmlinuz-*"))
    if images:
        release = images[0].name.removeprefix("vmlinuz-")
        # Debian generates modules.dep at install time; the lab's module loading needs it.
        r = _run(["depmod", "-b", str(dest), release])
        if r.returncode != 0:
            raise KernelFetchError(f"depmod for {release}: {r.stderr.strip()}")


def fetch_lab_kernel() -> Path:
    """vmlinuz of the current Debian generic kernel, unpacked with its modules (and modules.dep) for the lab.

    The tree is a root of its own (<cache>/boot/vmlinuz-R, <cache>/lib/modules/R/) so virtme-ng finds the
    modules next to the image; nothing is installed on the host."""
    return _fetch_image(FLAVORS["generic"][0], BUILD_DIR / "lab", "boot/vmlinuz-*", _unpack_with_modules)


def fetch_headers(flavor: str = "cloud") -> Path:
    """KDIR (the linux-headers-<release> tree) for flavor's current kernel, to build out-of-tree modules against."""
    flavor = canonical_flavor(flavor)
    cache = BUILD_DIR / "headers" / flavor
    try:
        pkgs = resolve(FLAVORS[flavor][1], ("linux-headers-", "linux-kbuild-"))
    except KernelFetchError:
        cached = _newest_cached(cache, "*/usr/src/linux-headers-*-amd64")
        if cached:
            log.warning("cannot resolve %s; using cached %s", FLAVORS[flavor][1], cached)
            return cached
        raise
    arch_pkg = next(p for p in pkgs if p.name.endswith("-amd64") and not p.name.endswith("-common"))
    release = arch_pkg.name.removeprefix("linux-headers-")
    root = cache / f"{arch_pkg.name}_{arch_pkg.version}"
    kdir = root / "usr" / "src" / f"linux-headers-{release}"
    if (kdir / "Makefile").exists() and f"include {root}/" in (kdir / "Makefile").read_text():
        return kdir  # unpacked here before (a moved checkout re-unpacks)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        for pkg in pkgs:
            deb = download(pkg, tmp / "deb")
            r = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if r.returncode != 0:
                raise KernelFetchError(f"dpkg-deb -x {deb.name}: {r.stderr.strip()}")
            deb.unlink()  # unpacked; the tree is the cache
        (tmp / "deb").rmdir()
        makefile = tmp / kdir.relative_to(root) / "Makefile"
        if not makefile.exists():
            raise KernelFetchError(f"headers for {release} unpacked without a Makefile")
        # Debian's arch Makefile includes the common tree by absolute path
        # (/usr/src/...); point it into this unpacked root instead.
        makefile.write_text(makefile.read_text().replace("include /usr/src/", f"include {root}/usr/src/"))
        if root.exists():  # from a checkout that lived elsewhere
            shutil.rmtree(root, ignore_errors=True)
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kdir


def kernel_release(kdir: Path) -> str:
    """The `uname -r` string of a headers tree (UTS_RELEASE; Debian 6.1's kernel.release file holds only 6.1.N)."""
    text = (kdir / "include" / "generated" / "utsrelease.h").read_text()
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    if not m:
        raise KernelFetchError(f"no UTS_RELEASE in {kdir}/include/generated/utsrelease.h")
    return m.group(1)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the path of the cached vmlinuz (or KDIR with --headers)."""
    ap = argparse.ArgumentParser(prog="python -m pyvmm.guest.linux.kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="cloud", help="cloud (6.1, default) or cloud-6.12")
    ap.add_argument("--headers", action="store_true", help="fetch the build headers and print KDIR instead")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        path = fetch_headers(args.flavor) if args.headers else fetch_kernel(args.flavor)
    except KernelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
