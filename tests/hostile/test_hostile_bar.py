"""Hostile BAR0: random offsets, sizes and values, GPAs at MMIO / past RAM / wrapping 64 bits, ENABLE/RESET storms.

Two sides: hypothesis drives read_bar/write_bar of a real PvschedDevice with
its real policy process (checking the device's invariants after every access),
and a tiny guest does the same from guest code under real KVM through
`pyvmm boot` (the VMM must not crash; the device must end usable).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import trio
from hostile_util import ROOT, alive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import abi
from pyvmm.abi import slots
from pyvmm.device.device import REG, STATUS_NAMES, PvschedDevice
from pyvmm.device.rate_limit import TokenBucket
from pyvmm.vmm.memory import HIGH_RAM_START, PCI_MMIO_END, PCI_MMIO_START, GuestMemoryError

sys.path.insert(0, str(ROOT / "tests" / "device"))
from standin import StandinVm  # tests/device: a machine-shaped stand-in with real threads
from tiny_guest import build_guest  # tests/: tiny guests by the boot contract

C = abi.C
U32 = 0xFFFFFFFF
MEM = 64 << 20
OK_GPA = 0x200000

u32 = st.integers(0, U32)
u64 = st.integers(0, 2**64 - 1)
offsets = st.one_of(st.sampled_from(sorted(REG.values())), st.integers(0, 0x1100))
sizes = st.sampled_from([4, 4, 4, 1, 2, 8, 3, 0])
hostile_gpas = st.sampled_from([
    PCI_MMIO_START, PCI_MMIO_START - 0x1000, PCI_MMIO_END - 0x1000, 0xFEE00000,   # MMIO hole, LAPIC
    MEM, MEM - 0x1000, 0x10000000, HIGH_RAM_START, HIGH_RAM_START + 0x1000,     # at/past the end of RAM
    2**64 - 0x1000, 2**64 - 0x2000, 2**63, 0x200800, 0, 0x1000,                  # wrapping, unaligned, low
])
hostile_sizes = st.sampled_from([0, 1, 64, 4095, 4096, 8192, 0x10000, MEM, 0xFFFFF000, U32])
op = st.one_of(
    st.tuples(st.just("w"), offsets, sizes, u64),
    st.tuples(st.just("r"), offsets, sizes, st.just(0)),
    st.tuples(st.just("gpa"), hostile_gpas, hostile_sizes, st.booleans()),
    st.tuples(st.just("ctl"), st.sampled_from([1, 2, 3, 0, 4, U32]), st.integers(1, 50), st.just(0)),
    st.tuples(st.just("negotiate"), st.sampled_from([OK_GPA, OK_GPA + 0x3000]), st.just(4096), st.just(0)),
)


class Device:
    """A started PvschedDevice (real policy process) on a stand-in machine, supervised from a trio thread."""

    def __init__(self) -> None:
        self.vm = StandinVm(2, MEM >> 20)
        self.dev = PvschedDevice()
        # register validation is under test here; the rate limit (AGAIN) in test_bar and the guest storm below
        self.dev._registrations = TokenBucket(1e9, 10**9)
        self.vm.add_pci_device(self.dev)
        trio.run(self.dev.start, self.vm)
        assert self.dev.supervisor is not None, self.dev.policy_error
        self.policy_pid = self.dev.supervisor.pid
        self.thread = threading.Thread(target=trio.run, args=(self.dev.run, self.vm), daemon=True)
        self.thread.start()
        self.longest_queue = 0

    def w(self, off: int, value: int) -> None:
        self.dev.write_bar(0, off, 4, value)

    def r(self, off: int) -> int:
        return self.dev.read_bar(0, off, 4)

    def status(self) -> int:
        v = self.r(REG["STATUS"])
        return v - (1 << 32) if v & 0x80000000 else v

    def negotiate(self, gpa: int, size: int) -> int:
        self.w(REG["GUEST_VERSION"], C.PVSCHED_VERSION)
        self.w(REG["GUEST_FEATURES"], C.PVSCHED_F_ALL)
        self.w(REG["SHM_GPA_LO"], gpa & U32)
        self.w(REG["SHM_GPA_HI"], gpa >> 32 & U32)
        self.w(REG["SHM_SIZE"], size & U32)
        self.w(REG["CONTROL"], C.PVSCHED_CTRL_ENABLE)
        return self.status()

    def apply(self, o: tuple) -> None:
        kind, a, b, c = o
        if kind == "w":
            self.dev.write_bar(0, a, b, c)
        elif kind == "r":
            v = self.dev.read_bar(0, a, b)
            assert isinstance(v, int) and 0 <= v <= U32, v
        elif kind == "gpa":
            was_active = self.dev.active is not None
            st_ = self.negotiate(a, b) if c else None
            if st_ is not None and not was_active:
                ok = self.acceptable(a, b)
                assert (st_ == C.PVSCHED_STATUS_ACTIVE) == ok, f"GPA {a:#x}+{b:#x}: STATUS {st_}, acceptable {ok}"
        elif kind == "ctl":
            for _ in range(b):
                self.w(REG["CONTROL"], a)
        else:
            if self.dev.active is None:
                assert self.negotiate(a, b) == C.PVSCHED_STATUS_ACTIVE
        self.longest_queue = max(self.longest_queue, len(self.dev.supervisor._queue))

    def acceptable(self, gpa: int, size: int) -> bool:
        """The BAR0 rules (pyvmm/device/README.md): page aligned, big enough, wholly in RAM, not in the MMIO hole, not wrapping."""
        if gpa % 4096 or size % 4096 or size < slots.min_shm_size(2) or gpa + size > 2**64:
            return False
        if gpa < HIGH_RAM_START and gpa + size > PCI_MMIO_START:
            return False
        try:
            self.vm.memory.region_of(gpa, size)
        except GuestMemoryError:
            return False
        return True

    def check(self) -> None:
        """The device's invariants: identity intact, a known status, an accepted area only ever inside RAM."""
        assert self.r(REG["MAGIC"]) == C.PVSCHED_MAGIC
        assert self.r(REG["NR_VCPUS"]) == 2
        assert self.r(REG["HOST_VERSION"]) == C.PVSCHED_VERSION
        assert self.r(REG["HOST_FEATURES"]) == C.PVSCHED_F_ALL
        status = self.status()
        assert status in STATUS_NAMES, status
        active = self.dev.active
        assert (active is not None) == (status in (C.PVSCHED_STATUS_ACTIVE, C.PVSCHED_STATUS_BUSY)), (status, active)
        if active is not None:
            gpa, size = active["gpa"], active["size"]
            assert gpa % 4096 == 0 and size % 4096 == 0 and size >= slots.min_shm_size(2)
            assert not (gpa < HIGH_RAM_START and gpa + size > PCI_MMIO_START)
            try:
                self.vm.memory.region_of(gpa, size)
            except GuestMemoryError as e:
                raise AssertionError(f"active area outside RAM: {e}") from None
            assert active["hva"] == self.vm.memory.hva(gpa, size)
        assert self.longest_queue <= 2, "registration requests piled up"
        assert alive(self.policy_pid), "the policy process died"

    def close(self) -> None:
        try:
            self.dev.stop()
            self.thread.join(10)
            self.dev.restore_threads()
        finally:
            self.vm.close()


@pytest.fixture(scope="module")
def device():
    d = Device()
    try:
        yield d
    finally:
        d.close()


@settings(derandomize=True, max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=12))
def test_hostile_bar_accesses_keep_the_device_valid(device: Device, ops: list[tuple]) -> None:
    for o in ops:
        device.apply(o)
        device.check()


def test_after_the_hostile_accesses_the_device_is_usable(device: Device) -> None:
    d = device
    d.w(REG["CONTROL"], C.PVSCHED_CTRL_RESET)
    assert d.status() == C.PVSCHED_STATUS_IDLE and d.dev.active is None
    assert [d.r(REG[k]) for k in ("GUEST_FEATURES", "GUEST_VERSION", "SHM_GPA_LO", "SHM_GPA_HI", "SHM_SIZE")] == [0] * 5
    assert d.negotiate(OK_GPA + 0x5000, 4096) == C.PVSCHED_STATUS_ACTIVE
    end = time.monotonic() + 10
    while True:  # the policy process ends registered with exactly the last area
        st_ = trio.run(d.dev.policy_status)
        if st_.get("registered") and st_["shm_gpa"] == OK_GPA + 0x5000:
            break
        assert time.monotonic() < end, f"the policy process never registered the last area: {st_}"
        time.sleep(0.02)
    assert {v["id"]: v["tid"] for v in st_["vcpus"]} == d.vm.vcpu_tids
    assert d.dev.supervisor.pid == d.policy_pid and d.dev.supervisor.alive


# A guest that finds pvsched on PCI, checks the BAD_GPA/TOO_SMALL/BAD_VERSION/BAD_FEATURE/BUSY table from
# guest code, storms ENABLE/RESET and ENABLE/DISABLE, then makes N pseudo-random accesses (xorshift32) of
# every size at random offsets with random values, and finally negotiates properly: it exits with STATUS
# (1 = ACTIVE), or with the number of the check that failed (>= 10).
STORM_GUEST = r"""
.macro W off, val
    movl $\val, \off(%rdi)
.endm
.macro AREA lo, hi, size
    W 0x10, 0x10000
    W 0x0c, 0xf
    W 0x18, \lo
    W 0x1c, \hi
    W 0x20, \size
    W 0x24, 1
.endm
.macro EXPECT status, code
    movl 0x28(%rdi), %eax
    cmp $\status, %eax
    jne fail\code
.endm
.macro XORSHIFT r
    mov \r, %eax
    shl $13, %eax
    xor %eax, \r
    mov \r, %eax
    shr $17, %eax
    xor %eax, \r
    mov \r, %eax
    shl $5, %eax
    xor %eax, \r
.endm
_start:
    test %rdi, %rdi               # vCPU 1 stays out of the way (halted, interrupts off)
    jnz 99f
    PCI_FIND 0x70731234
    CFG_R 0x10
    and $0xfffffff0, %eax
    mov %eax, %edi
    AREA 0xc0000000, 0, 0x1000
    EXPECT -1, 10
    AREA 0x10000000, 0, 0x1000
    EXPECT -1, 11
    AREA 0xfffff000, 0xffffffff, 0x2000
    EXPECT -1, 12
    AREA 0x200800, 0, 0x1000
    EXPECT -1, 13
    AREA 0x200000, 0, 0
    EXPECT -2, 14
    AREA 0x200000, 0, 0xfffff000
    EXPECT -1, 15
    AREA 0, 1, 0x1000
    EXPECT -1, 16
    AREA 0x3fff000, 0, 0x2000
    EXPECT -1, 17
    AREA 0x200000, 0, 0x1000
    EXPECT 1, 25
    W 0x24, 2
    W 0x10, 0x20000
    W 0x24, 1
    EXPECT -3, 18
    W 0x10, 0x10000
    W 0x0c, 0x40
    W 0x24, 1
    EXPECT -4, 19
    AREA 0x200000, 0, 0x1000
    EXPECT 1, 20
    W 0x24, 1
    EXPECT -5, 21
    W 0x24, 2
    EXPECT 0, 22
    mov $3000, %ecx
storm1:                           # ENABLE/RESET storm
    AREA 0x200000, 0, 0x1000
    W 0x24, 3
    dec %ecx
    jnz storm1
    EXPECT 0, 23
    mov $3000, %ecx
storm2:                           # ENABLE/DISABLE storm
    W 0x24, 1
    W 0x24, 2
    dec %ecx
    jnz storm2
    mov $0x2545f491, %r8d
    mov $0x9e3779b9, %r9d
    mov $NRAND, %ecx
random:
    XORSHIFT %r8d
    XORSHIFT %r9d
    mov %r8d, %esi
    and $0x3c, %esi              # mostly the registers and just past them
    test $0x700, %r8d
    jnz 1f
    mov %r8d, %esi
    shr $4, %esi
    and $0xfff, %esi             # sometimes anywhere in the BAR, unaligned too
1:  add %rdi, %rsi
    mov %r8d, %eax
    shr $20, %eax
    and $7, %eax
    cmp $0, %eax
    je 2f
    cmp $1, %eax
    je 3f
    cmp $2, %eax
    je 4f
    cmp $3, %eax
    je 5f
    cmp $4, %eax
    je 6f
    movl %r9d, (%rsi)            # 5-7: 32-bit writes of random values
    jmp 9f
2:  movb %r9b, (%rsi)
    jmp 9f
3:  movw %r9w, (%rsi)
    jmp 9f
4:  mov %r9, %rax
    shl $32, %rax
    or %r9, %rax
    movq %rax, (%rsi)
    jmp 9f
5:  movl (%rsi), %eax
    jmp 9f
6:  mov %r9d, %eax
    and $3, %eax
    movl %eax, 0x24(%rdi)        # CONTROL: ENABLE/DISABLE/RESET/0 at random
9:  dec %ecx
    jnz random
    W 0x24, 3
    EXPECT 0, 24
    AREA 0x200000, 0, 0x1000
again:                            # AGAIN: the storms spent the registration budget; ENABLE until it refills
    movl 0x28(%rdi), %eax
    cmp $-6, %eax
    jne 98f
    W 0x24, 1
    jmp again
98: movl 0x28(%rdi), %eax
    mov $0xf4, %dx
    out %al, %dx
99: cli
    hlt
    jmp 99b
""" + "".join(f"fail{n}: EXIT {n}\n" for n in range(10, 26))


def test_guest_driven_bar_storm(tmp_path: Path) -> None:
    elf = build_guest(tmp_path, STORM_GUEST.replace("NRAND", "20000"), "storm")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYVMM_RUN_DIR": str(tmp_path)}
    p = subprocess.Popen(["chrt", "-f", str(abi.C.PVSCHED_WATCHDOG_PRIO), "timeout", "-s", "KILL", "120", "chrt", "-o", "0", sys.executable,
                          "-m", "pyvmm.cli", "boot", "--no-console-input", "--kernel", str(elf), "--cpus", "2",
                          "--mem", str(MEM >> 20), "--timeout", "90"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _out, err = p.communicate(timeout=110)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert "Traceback" not in err, err[-3000:]
    assert p.returncode == C.PVSCHED_STATUS_ACTIVE, f"exit {p.returncode} (>= 10: guest check failed)\n{err[-3000:]}"
    # each kind of misbehaviour logged once: a guest cannot flood the log or grow the VMM's memory with
    # distinct offsets or CONTROL values (20000 random accesses above)
    warnings = Counter(line for line in err.splitlines() if line.startswith("pyvmm.pvsched"))
    assert warnings and max(warnings.values()) == 1, f"a guest misbehaviour logged more than once: {warnings}"
    assert len(warnings) <= 7, "\n".join(warnings)  # 7th: the registration rate limit (AGAIN)
    assert "registered VM" in err and "died" not in err, err[-3000:]


BIG_AREA_GUEST = r"""
_start:
    test %rdi, %rdi
    jnz 99f
    PCI_FIND 0x70731234
    CFG_R 0x10
    and $0xfffffff0, %eax
    mov %eax, %edi
    movl $0x10000, 0x10(%rdi)
    movl $0xf, 0x0c(%rdi)
    movl $0x200000, 0x18(%rdi)
    movl $0, 0x1c(%rdi)
    movl $0x20000000, 0x20(%rdi)  # 512 MiB: valid (in RAM, aligned), far more than 2 slots need
    movl $1, 0x24(%rdi)
99: cli
    hlt
    jmp 99b
"""


def test_a_huge_shared_area_does_not_make_the_host_lock_guest_ram(tmp_path: Path) -> None:
    """SHM_SIZE has no upper limit, and the policy process once ran with mlockall(MCL_FUTURE): mapping the whole area
    populated and locked it (a 512 MiB area: +512 MiB locked host RAM; a big VM's guest could lock it all)."""
    from hostile_util import Vm, _vmm_pid, wait_active

    elf = build_guest(tmp_path, BIG_AREA_GUEST, "big")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(["chrt", "-f", str(abi.C.PVSCHED_WATCHDOG_PRIO), "timeout", "-s", "KILL", "60", "chrt", "-o", "0", sys.executable,
                          "-m", "pyvmm.cli", "boot", "--no-console-input", "--kernel", str(elf), "--cpus", "2",
                          "--mem", "1024", "--timeout", "40"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    vm = Vm(p)
    try:
        vm.pid = _vmm_pid(p)
        st = wait_active(vm).st
        assert st["pvsched"]["shm_size"] == 0x20000000
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{vm.policy_pid}/status").read_text().splitlines())
        locked_mib, rss_mib = (int(fields[k].split()[0]) >> 10 for k in ("VmLck", "VmRSS"))
        print(f"policy process with a 512 MiB shared area: VmLck {locked_mib} MiB, VmRSS {rss_mib} MiB")
        assert locked_mib < 400 and rss_mib < 400, f"VmLck {locked_mib} MiB, VmRSS {rss_mib} MiB"
    finally:
        vm.kill()
