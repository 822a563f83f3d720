"""The kernel fetcher follows Debian's meta packages, and the module builds against both current kernels."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyvmm.guest.linux import build_image, kernel

FLAVORS = list(kernel.FLAVORS)  # the 6.1 cloud kernel and the 6.12 one


def _candidate(package: str) -> str:
    out = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True, check=False
    )
    return next(line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("Version:"))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_kernel_is_the_meta_packages_current_candidate(linux_image, flavor):
    """Not pinned: the cached bzImage is the version the meta package resolves to today."""
    image = linux_image(flavor)
    meta = kernel.FLAVORS[flavor][0]
    assert f"_{_candidate(meta)}" in image.kernel.parent.name
    data = image.kernel.read_bytes()
    assert data[0x202:0x206] == b"HdrS", "not a bzImage (boot protocol header missing)"
    assert image.release in image.kernel.name


@pytest.mark.parametrize("flavor", FLAVORS)
def test_module_vermagic_matches_its_kernel(linux_image, flavor):
    """pvsched.ko is built against the very kernel the image boots (insmod would refuse otherwise)."""
    image = linux_image(flavor)
    ko = image.module.read_bytes()
    assert f"vermagic={image.release} ".encode() in ko
    assert b"alias=pci:v00001234d00007073" in ko, "PCI id table missing from the module"
    assert b"parm=selftest:" in ko


def test_rebuild_is_a_no_op_when_cached(linux_image):
    """A second build of an up-to-date image touches nothing (setup and fixtures stay fast)."""
    image = linux_image("cloud")
    before = image.initrd.stat().st_mtime_ns, image.module.stat().st_mtime_ns
    again = build_image.build_image("cloud")
    assert again == image
    assert (again.initrd.stat().st_mtime_ns, again.module.stat().st_mtime_ns) == before


def test_unknown_flavor_is_one_line_and_nonzero():
    r = subprocess.run(
        [sys.executable, "-m", "pyvmm.guest.linux.kernel", "--flavor", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "unknown kernel flavor 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_stale_image_in_a_read_only_checkout_is_one_clear_error(monkeypatch):
    """Inside `pyvmm lab` the checkout is read-only: a stale image must be one line naming the fix, not a traceback."""
    import errno

    from pyvmm.bench.run import BenchError, linux_image

    def read_only(flavor):
        raise OSError(errno.EROFS, "Read-only file system", "/repo/build/image/cloud/initramfs.cpio.tmp")

    monkeypatch.setattr(kernel, "fetch_kernel", lambda flavor: None)
    monkeypatch.setattr(build_image, "build_initramfs", read_only)
    with pytest.raises(BenchError) as e:
        linux_image()
    msg = str(e.value)
    assert "\n" not in msg and "initramfs.cpio.tmp" in msg and "python -m pyvmm.guest.linux.build_image" in msg
