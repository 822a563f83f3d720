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

from pyvmm.boot import BootConfig, run_vm
from pyvmm.vmm import acpi, x86
from pyvmm.vmm.loader_elf import ImageError
from pyvmm.vmm.loader_linux import e820_map, mp_table, setup_linux
from pyvmm.vmm.machine import Machine
from pyvmm.vmm.memory import GuestMemory


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


def _tables(blob: bytes) -> dict[bytes, tuple[int, bytes]]:
    """Signature -> (address, table) of every table the XSDT and the FADT reach, checksums verified."""
    rsdp = blob[:36]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0 and rsdp[15] == 2

    def at(addr: int) -> bytes:
        t = blob[addr - acpi.RSDP_ADDR:]
        t = t[:struct.unpack_from("<I", t, 4)[0]]
        assert sum(t) % 256 == 0 or t[:4] == b"FACS", t[:4]
        return t

    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = at(xsdt_addr)
    found = {b"XSDT": (xsdt_addr, xsdt)}
    for i in range((len(xsdt) - 36) // 8):
        addr = struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0]
        found[at(addr)[:4]] = (addr, at(addr))
    fadt = found[b"FACP"][1]
    for off, sig in ((132, b"FACS"), (140, b"DSDT")):
        addr = struct.unpack_from("<Q", fadt, off)[0]
        assert addr == struct.unpack_from("<I", fadt, 36 if sig == b"FACS" else 40)[0]  # 32- and 64-bit agree
        found[sig] = (addr, at(addr))
    return found


def test_acpi_tables_are_well_formed():
    t = _tables(acpi.acpi_tables(2))
    assert set(t) == {b"XSDT", b"FACP", b"FACS", b"DSDT", b"APIC"}
    assert t[b"FACS"][0] % 64 == 0 and len(t[b"FACS"][1]) == 64
    madt = t[b"APIC"][1]
    entries, off = [], 44
    while off < len(madt):
        entries.append((madt[off], madt[off + 2:off + madt[off + 1]]))
        off += madt[off + 1]
    assert [e[0] for e in entries] == [0, 0, 1, 4]
    assert entries[1][1][:2] == bytes([1, 1])  # processor UID 1, APIC id 1
    assert struct.unpack_from("<I", entries[2][1], 2)[0] == 0xFEC00000
    end = max(a + len(x) for a, x in t.values())
    assert end <= x86.MPTABLE_ADDR  # the MP table follows at 0xF0000


def test_fadt_points_at_the_pm_block_and_the_reset_register():
    fadt = _tables(acpi.acpi_tables(1))[b"FACP"][1]
    assert len(fadt) == acpi.FADT_LEN and fadt[8] == acpi.FADT_REVISION
    assert struct.unpack_from("<H", fadt, 46)[0] == acpi.SCI_IRQ
    assert struct.unpack_from("<I", fadt, 48)[0] == 0  # no SMI_CMD: ACPI mode from the start
    assert struct.unpack_from("<III", fadt, 56)[0] == acpi.PM1A_EVT
    assert struct.unpack_from("<I", fadt, 64)[0] == acpi.PM1A_CNT
    assert struct.unpack_from("<I", fadt, 76)[0] == acpi.PM_TMR
    assert tuple(fadt[88:92]) == (4, 2, 0, 4)
    assert struct.unpack_from("<H", fadt, 109)[0] & acpi.IAPC_NO_CMOS_RTC
    assert struct.unpack_from("<I", fadt, 112)[0] & acpi.FADT_RESET_REG_SUP
    space, width, _, _, addr = struct.unpack_from("<BBBBQ", fadt, 116)
    assert (space, width, addr, fadt[128]) == (acpi.GAS_SYSTEM_IO, 8, acpi.RESET_REG, acpi.RESET_VALUE)
    assert struct.unpack_from("<BBBBQ", fadt, 172)[4] == acpi.PM1A_CNT


def test_dsdt_names_s5_and_a_pci_root_bridge():
    dsdt = _tables(acpi.acpi_tables(1))[b"DSDT"][1]
    aml = dsdt[36:]
    # Name(_S5_, Package(4) {5, 5, 0, 0})
    assert aml.startswith(b"\x08_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00")
    assert b"\x5b\x82" in aml and b"PCI0" in aml  # Device(PCI0)
    assert b"_HID\x0c" + struct.pack("<I", acpi.eisa_id("PNP0A03")) in aml
    assert struct.pack("<I", acpi.eisa_id("PNP0A03")) == bytes([0x41, 0xD0, 0x0A, 0x03])


def test_aml_pkglength_encodings():
    assert acpi.aml_pkglength(0x3E) == bytes([0x3F])
    assert acpi.aml_pkglength(0x3F) == bytes([0x41, 0x04])   # 0x41 total: two bytes
    assert acpi.aml_pkglength(0x1000) == bytes([0x83, 0x00, 0x01])  # 0x1003 in all


def test_acpi_pm_powers_off_on_s5_and_resets_on_the_reset_value():
    from pyvmm.vmm.acpi_pm import AcpiPm

    events: list[str] = []
    pm = AcpiPm(events.append)
    cnt = acpi.PM1A_CNT - acpi.PM_BASE
    assert pm.io_read(cnt, 2) & acpi.PM1_CNT_SCI_EN
    pm.io_write(cnt, 2, acpi.SLP_TYP_S5 << 10)                  # SLP_TYP without SLP_EN: nothing yet
    pm.io_write(cnt, 2, 3 << 10 | acpi.PM1_CNT_SLP_EN)          # S3: not supported, ignored
    assert events == []
    pm.io_write(cnt, 2, acpi.SLP_TYP_S5 << 10 | acpi.PM1_CNT_SLP_EN | acpi.PM1_CNT_SCI_EN)
    assert events == ["poweroff"]
    pm.io_write(acpi.RESET_REG - acpi.PM_BASE, 1, 0x02)          # not the reset value
    pm.io_write(acpi.RESET_REG - acpi.PM_BASE, 1, acpi.RESET_VALUE)
    assert events == ["poweroff", "reset"]


def test_pm_timer_counts_at_3_58_mhz():
    import time

    from pyvmm.vmm.acpi_pm import AcpiPm

    pm = AcpiPm(lambda kind: None)
    tmr = acpi.PM_TMR - acpi.PM_BASE
    t0, a = time.monotonic(), pm.io_read(tmr, 4)
    time.sleep(0.05)
    b, t1 = pm.io_read(tmr, 4), time.monotonic()
    rate = ((b - a) & 0xFFFFFFFF) / (t1 - t0)
    assert 0.9 * acpi.PM_TIMER_HZ < rate < 1.1 * acpi.PM_TIMER_HZ


def test_cpuid_sets_the_hypervisor_bit_and_a_consistent_xsave_leaf():
    """Leaf 0xD offers only states whose feature bits are offered, and EBX/ECX size all of them."""
    from pyvmm.vmm import kvm

    entries = {(1, 0): (0, 0, 0, 0), (7, 0): (0, 0, 0, 0),        # no AVX, no PKU
               (0xD, 0): (0x207, 0x980, 0xA88, 0), (0xD, 2): (0x100, 0x240, 0, 0), (0xD, 9): (8, 0xA80, 0, 0)}
    c = kvm.cpuid2_type(len(entries))()
    c.nent = len(entries)
    for i, ((f, idx), regs) in enumerate(entries.items()):
        e = c.entries[i]
        e.function, e.index = f, idx
        e.eax, e.ebx, e.ecx, e.edx = regs
    out = x86.vcpu_cpuid(c, 3)
    got = {(out.entries[i].function, out.entries[i].index): out.entries[i] for i in range(out.nent)}
    assert got[(1, 0)].ecx & x86.CPUID_1_ECX_HYPERVISOR and got[(1, 0)].ebx >> 24 == 3
    d0 = got[(0xD, 0)]
    assert (d0.eax, d0.ebx, d0.ecx) == (0x3, 576, 576)
    assert got[(0xD, 2)].eax == got[(0xD, 9)].eax == 0
    # with AVX and PKU offered, both states stay and the size covers PKRU at 0xa80
    c.entries[0].ecx, c.entries[1].ecx = x86.CPUID_1_ECX_AVX, x86.CPUID_7_ECX_PKU
    c.entries[2].eax, c.entries[2].ebx, c.entries[2].ecx = 0x207, 0x980, 0xA88
    c.entries[3].eax, c.entries[4].eax = 0x100, 8
    d0 = {(e.function, e.index): e for e in (x86.vcpu_cpuid(c, 0).entries[i] for i in range(5))}[(0xD, 0)]
    assert (d0.eax, d0.ebx, d0.ecx) == (0x207, 576, 0xA88)


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
    kernel_mod = pytest.importorskip("pyvmm.guest.linux.kernel")
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
    build_image = pytest.importorskip("pyvmm.guest.linux.build_image")
    img = build_image.build_image("cloud")
    cmd = [sys.executable, "-m", "pyvmm.cli", "boot", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
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
