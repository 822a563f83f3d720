"""Linux guest fixtures: the Debian kernel + pvsched module image, built on first use and cached in
pyvmm/guest/linux/build/, booted under QEMU with TCG (this machine's KVM cannot run Linux)."""

from __future__ import annotations

import pytest

from pyvmm.guest.linux import build_image, kernel


@pytest.fixture(scope="session")
def linux_image():
    """linux_image(flavor) -> build_image.Image, built once per session; skips only when the archive is unreachable."""
    images: dict[str, build_image.Image] = {}

    def get(flavor: str = "cloud") -> build_image.Image:
        if flavor not in images:
            try:
                images[flavor] = build_image.build_image(flavor)
            except kernel.KernelFetchError as e:
                pytest.skip(f"cannot fetch the Debian {flavor} kernel or headers (archive unreachable?): {e}")
        return images[flavor]

    return get
