"""Linux loader: zero page, e820, command line, initramfs, MP table; and a real Debian kernel's banner (slow)."""

from __future__ import annotations

import os
import selectors
import signal
import struct
import subprocess
import sys
import time

import pytest

from vmm import acpi, x86
from vmm.boot import BootConfig, run_vm
from vmm.loader_elf import ImageError
from vmm.loader_linux import e820_map, mp_table, setup_linux
from vmm.machine import Machine
from vmm.memory import GuestMemory


def fake_bzimage(version: int = 0x20F, xloadflags: int = 1, payload: bytes = b"\x90" * 4096) -> bytes:
    """The setup header fields the loader reads, around a dummy protected-mode payload."""
    setup = bytearray(2 * 512)  # setup_sects = 1
    setup[0x1F1] = 1
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x201] = 0x6A  # jump over the header: it ends at 0x202 + 0x6a = 0x26c
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2048)
    struct.pack_into("<I", setup, 0x260, 8 << 20)  # init_size
    return bytes(setup) + payload


def test_mp_table_is_well_formed():
    t = mp_table(3)
    assert t[:4] == b"_MP_" and sum(t[:16]) % 256 == 0
    assert struct.unpack_from("<I", t, 4)[0] == x86.MPTABLE_ADDR + 16
    cfg = t[16:]
    length, count = struct.unpack_from("<H", cfg, 4)[0], struct.unpack_from("<H", cfg, 34)[0]
    assert cfg[:4] == b"PCMP" and length == len(cfg) and sum(cfg) % 256 == 0
    cpus = [cfg[44 + 20 * i: 44 + 20 * i + 20] for i in range(3)]
    assert [c[0] for c in cpus] == [0, 0, 0] and [c[1] for c in cpus] == [0, 1, 2]
    assert cpus[0][3] == 3 and cpus[1][3] == 1  # BSP flag only on CPU 0
    assert count == 3 + 1 + 1 + 16 + 2


def test_acpi_rsdp_xsdt_madt_are_well_formed():
    blob = acpi.acpi_tables(2)
    rsdp = blob[:36]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0 and rsdp[15] == 2
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = blob[xsdt_addr - acpi.RSDP_ADDR:]
    xsdt = xsdt[:struct.unpack_from("<I", xsdt, 4)[0]]
    assert xsdt[:4] == b"XSDT" and sum(xsdt) % 256 == 0 and len(xsdt) == 44
    madt_addr = struct.unpack_from("<Q", xsdt, 36)[0]
    madt = blob[madt_addr - acpi.RSDP_ADDR:]
    assert madt[:4] == b"APIC" and struct.unpack_from("<I", madt, 4)[0] == len(madt) and sum(madt) % 256 == 0
    entries, off = [], 44
    while off < len(madt):
        entries.append((madt[off], madt[off + 2:off + madt[off + 1]]))
        off += madt[off + 1]
    assert [e[0] for e in entries] == [0, 0, 1, 4]
    assert entries[1][1][:2] == bytes([1, 1])  # processor UID 1, APIC id 1
    assert struct.unpack_from("<I", entries[2][1], 2)[0] == 0xFEC00000


def test_e820_splits_around_the_bios_hole_and_the_mmio_hole():
    mem = GuestMemory(3 << 30 | 512 << 20)
    try:
        assert e820_map(mem) == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 0xC0000000 - 0x100000, 1),
                                 (4 << 30, 512 << 20, 1)]
    finally:
        mem.close()


def test_zero_page_cmdline_initrd_and_entry():
    m = Machine(2, 64)
    try:
        initrd = b"\x07" * 10000
        setup_linux(m, fake_bzimage(), "console=ttyS0 quiet", initrd)
        zp = m.memory.read(x86.ZERO_PAGE_ADDR, 4096)
        assert zp[0x202:0x206] == b"HdrS" and zp[0x210] == 0xFF
        cmd_ptr = struct.unpack_from("<I", zp, 0x228)[0]
        assert m.memory.read(cmd_ptr, 20) == b"console=ttyS0 quiet\0"
        rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
        assert rd_size == len(initrd) and rd_addr % 4096 == 0 and rd_addr + rd_size <= 64 << 20
        assert m.memory.read(rd_addr, rd_size) == initrd
        assert zp[0x1E8] == 3  # e820 entries
        assert m.memory.read(0x100000, 4096) == b"\x90" * 4096
        regs = m.vcpus[0].get_regs()
        assert regs.rip == 0x100200 and regs.rsi == x86.ZERO_PAGE_ADDR
        assert m.vcpus[0].get_sregs().efer & x86.EFER_LMA
    finally:
        m.close()


@pytest.mark.parametrize("image, msg", [
    (fake_bzimage(version=0x20A), "without a 64-bit entry"),
    (fake_bzimage(xloadflags=0), "without a 64-bit entry"),
])
def test_unsupported_bzimages_are_refused(image, msg):
    m = Machine(1, 64)
    try:
        with pytest.raises(ImageError, match=msg):
            setup_linux(m, image, "", None)
        with pytest.raises(ImageError, match="at most 2048"):
            setup_linux(m, fake_bzimage(), "x" * 3000, None)
    finally:
        m.close()


@pytest.mark.slow
def test_debian_cloud_kernel_prints_its_banner():
    """Minutes here (CPL0 is emulated); seconds on a host with VMX/SVM."""
    kernel_mod = pytest.importorskip("guest_image.linux.kernel")
    kernel = kernel_mod.fetch_kernel("cloud")
    t0 = time.monotonic()
    seen = {}

    class Watch:
        """Console stream that stops the VM once the banner line is complete."""

        buf = b""

        def write(self, b: bytes) -> None:
            self.buf += b
            if b"Linux version" in self.buf and b"\n" in self.buf.split(b"Linux version", 1)[1]:
                seen.setdefault("t", time.monotonic() - t0)
                seen["machine"].request_stop(0, "banner seen")

        def flush(self) -> None:
            pass

    def setup(m: Machine) -> None:
        seen["machine"] = m

    r = run_vm(BootConfig(kernel=kernel, cmdline="console=ttyS0 earlyprintk=serial", cpus=2, mem_mib=512,
                          pvsched=False, control_socket=False, timeout=900, console_stream=Watch(),
                          setup=[setup]))
    assert "Linux version" in r.console, (r.message, r.console[-2000:])
    print(f"banner after {seen.get('t', 0):.1f} s")


@pytest.mark.slow
def test_pyvmm_boot_cli_with_debian_kernel_and_initrd_reaches_the_banner():
    """`pyvmm boot --kernel <debian bzImage> --initrd <image>` with pvsched on: the banner on stdout."""
    build_image = pytest.importorskip("guest_image.linux.build_image")
    img = build_image.build_image("cloud")
    cmd = [sys.executable, "-m", "vmm.cli", "boot", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
           "--cmdline", "console=ttyS0 earlyprintk=serial pvsched.workload=selftest", "--mem", "512",
           "--timeout", "600"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        while time.monotonic() - t0 < 600 and b"Linux version" not in out:
            if sel.select(timeout=1.0):
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        assert b"Linux version" in out, (p.poll(), out[-2000:], p.stderr.read(4000) if p.poll() is not None else b"")
        print(f"banner after {time.monotonic() - t0:.1f} s with --initrd {img.initrd.name} and pvsched")
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert p.returncode in (128 + signal.SIGTERM, 125), p.returncode  # stopped by us, or the known emulation failure
