"""BAR0 from Python: negotiation, each refusal, not-sticky errors, DISABLE/ENABLE, RESET, bad accesses."""

from __future__ import annotations

import logging
import threading

import pytest
import trio
from device_harness import SHM_GPA, Bar, C
from hypothesis import given, settings
from hypothesis import strategies as st
from standin import StandinVm

from pyvmm.device.device import REG, REGISTRATION_BURST, REGISTRATION_RATE_PER_S, PvschedConfigError, PvschedDevice
from pyvmm.device.rate_limit import TokenBucket
from pyvmm.vmm.memory import GIB, HIGH_RAM_START, MIB, PCI_MMIO_START


@pytest.fixture
def bar(vm: StandinVm) -> Bar:
    """A device without a policy process, attached to the stand-in machine."""
    dev = PvschedDevice(policy=False)
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    return Bar(dev)


def test_identity_and_read_only_registers(bar: Bar) -> None:
    assert bar.read("MAGIC") == C.PVSCHED_MAGIC == 0x43535650
    assert bar.read("HOST_VERSION") == 0x00010000
    assert bar.read("HOST_FEATURES") == C.PVSCHED_F_ALL
    assert bar.read("NR_VCPUS") == 2
    assert bar.status() == C.PVSCHED_STATUS_IDLE
    for reg in ("MAGIC", "HOST_VERSION", "HOST_FEATURES", "NR_VCPUS", "STATUS"):
        before = bar.read(reg)
        bar.write(reg, 0x12345678)
        assert bar.read(reg) == before
    dev = bar.dev
    assert (dev.vendor_id, dev.device_id, dev.class_code, dev.revision) == (0x1234, 0x7073, 0xFF, 1)
    assert dev.bars[0].size == 4096


def test_full_negotiation(bar: Bar, vm: StandinVm) -> None:
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    snap = bar.dev.snapshot()
    assert snap["state"] == "active"
    assert (snap["version"], snap["features"]) == (C.PVSCHED_VERSION, C.PVSCHED_F_ALL)
    assert (snap["shm_gpa"], snap["shm_size"]) == (SHM_GPA, 4096)
    assert snap["shm_hva"] == vm.memory.hva(SHM_GPA, 4096)
    # RW registers read back what the guest wrote.
    assert bar.read("SHM_GPA_LO") == SHM_GPA and bar.read("SHM_SIZE") == 4096
    assert bar.read("GUEST_FEATURES") == C.PVSCHED_F_ALL and bar.read("GUEST_VERSION") == C.PVSCHED_VERSION
    assert bar.read("CONTROL") == 0  # write-only


def test_subset_of_features_and_older_minor_accepted(vm: StandinVm) -> None:
    dev = PvschedDevice(policy=False, host_version=0x00010003)
    vm.add_pci_device(dev)
    b = Bar(dev)
    assert b.negotiate(version=0x00010001, features=C.PVSCHED_F_WAKE_HINT) == C.PVSCHED_STATUS_ACTIVE
    assert dev.snapshot()["feature_names"] == ["wake_hint"]


REFUSALS = {
    "newer major": ({"version": 0x00020000}, C.PVSCHED_STATUS_BAD_VERSION),
    "newer minor": ({"version": 0x00010001}, C.PVSCHED_STATUS_BAD_VERSION),
    "version never written": ({"version": 0}, C.PVSCHED_STATUS_BAD_VERSION),
    "unknown feature bit": ({"features": 1 << 6}, C.PVSCHED_STATUS_BAD_FEATURE),
    "high feature bit": ({"features": 0x80000000 | 1}, C.PVSCHED_STATUS_BAD_FEATURE),
    "unaligned GPA": ({"gpa": SHM_GPA + 8}, C.PVSCHED_STATUS_BAD_GPA),
    "outside RAM": ({"gpa": 64 * MIB}, C.PVSCHED_STATUS_BAD_GPA),
    "straddles end of RAM": ({"gpa": 64 * MIB - 4096, "size": 8192}, C.PVSCHED_STATUS_BAD_GPA),
    "in the MMIO hole": ({"gpa": PCI_MMIO_START}, C.PVSCHED_STATUS_BAD_GPA),
    "wraps around 2^64": ({"gpa": (1 << 64) - 4096, "size": 8192}, C.PVSCHED_STATUS_BAD_GPA),
    "size zero": ({"size": 0}, C.PVSCHED_STATUS_TOO_SMALL),
    "size not a page multiple": ({"size": 4096 + 64}, C.PVSCHED_STATUS_TOO_SMALL),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_refusal_then_usable(bar: Bar, name: str) -> None:
    kwargs, code = REFUSALS[name]
    assert bar.negotiate(**kwargs) == code
    assert bar.dev.active is None
    # Not sticky: the corrected ENABLE is judged from scratch.
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE


def test_too_small_for_many_vcpus() -> None:
    vm = StandinVm(nr_vcpus=40)  # needs 64 + 128 * 40 = 5184 bytes: one page is too small
    try:
        dev = PvschedDevice(policy=False, host_features=C.PVSCHED_F_CRITICAL_SECTIONS)
        vm.add_pci_device(dev)
        b = Bar(dev)
        assert b.read("NR_VCPUS") == 40
        assert b.negotiate(features=C.PVSCHED_F_CRITICAL_SECTIONS) == C.PVSCHED_STATUS_TOO_SMALL
        # A feature the host does not offer (here: anything beyond bit 0) is refused too.
        assert b.negotiate(size=8192, features=C.PVSCHED_F_WAKE_HINT) == C.PVSCHED_STATUS_BAD_FEATURE
        assert b.negotiate(size=8192, features=C.PVSCHED_F_CRITICAL_SECTIONS) == C.PVSCHED_STATUS_ACTIVE
    finally:
        vm.close()


def test_busy_disable_enable_reset(bar: Bar) -> None:
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    bar.write("CONTROL", C.PVSCHED_CTRL_ENABLE)
    assert bar.status() == C.PVSCHED_STATUS_BUSY
    assert bar.dev.active is not None  # BUSY refuses the second ENABLE; sharing goes on
    bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
    assert bar.status() == C.PVSCHED_STATUS_IDLE and bar.dev.active is None
    bar.write("CONTROL", C.PVSCHED_CTRL_ENABLE)  # registers kept: ENABLE again works
    assert bar.status() == C.PVSCHED_STATUS_ACTIVE
    bar.write("CONTROL", C.PVSCHED_CTRL_RESET)
    assert bar.status() == C.PVSCHED_STATUS_IDLE and bar.dev.active is None
    assert [bar.read(r) for r in ("GUEST_FEATURES", "GUEST_VERSION", "SHM_GPA_LO", "SHM_GPA_HI", "SHM_SIZE")] == [0] * 5
    bar.write("CONTROL", C.PVSCHED_CTRL_ENABLE)  # defaults: version 0
    assert bar.status() == C.PVSCHED_STATUS_BAD_VERSION
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE


def test_unknown_offsets_and_sizes_ignored_and_logged_once(bar: Bar, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyvmm.pvsched")
    dev = bar.dev
    for _ in range(3):
        assert dev.read_bar(0, 0x100, 4) == 0
        dev.write_bar(0, 0x100, 4, 0xFFFFFFFF)
        assert dev.read_bar(0, 0x2, 4) == 0  # unaligned: not a register
        assert dev.read_bar(0, REG["MAGIC"], 2) == 0
        assert dev.read_bar(0, REG["MAGIC"], 8) == 0
        dev.write_bar(0, REG["SHM_SIZE"], 1, 0xFF)
        dev.write_bar(0, REG["CONTROL"], 4, 0x77)
        dev.write_bar(0, REG["MAGIC"], 4, 1)
    for i in range(200):  # distinct offsets and CONTROL values: still one line per kind, no growing state
        dev.read_bar(0, 0x200 + 4 * i, 4)
        dev.write_bar(0, 0x200 + 4 * i, 4, i)
        dev.write_bar(0, REG["CONTROL"], 4, 0x100 + i)
    assert len(dev._warned) <= 8
    assert bar.read("SHM_SIZE") == 0  # the 1-byte write did nothing
    assert bar.read("MAGIC") == C.PVSCHED_MAGIC
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("unknown offset" in m for m in msgs) == 2  # one for reads, one for writes
    assert sum("32-bit" in m for m in msgs) == 1
    assert sum("unknown CONTROL value" in m for m in msgs) == 1
    assert sum("read-only register" in m for m in msgs) == 1
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE


def test_enable_disable_storm_does_not_flood_the_log(bar: Bar, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyvmm.pvsched")
    statuses = []
    for _ in range(500):
        statuses.append(bar.negotiate())
        bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
    assert statuses[:REGISTRATION_BURST] == [C.PVSCHED_STATUS_ACTIVE] * REGISTRATION_BURST
    assert set(statuses) <= {C.PVSCHED_STATUS_ACTIVE, C.PVSCHED_STATUS_AGAIN}
    assert len([r for r in caplog.records if r.levelno >= logging.INFO]) <= 11


def test_registrations_are_rate_limited_per_vm(bar: Bar) -> None:
    """Each registration is RT work in the policy process: a burst, then REGISTRATION_RATE_PER_S, then AGAIN."""
    now = [0.0]
    bar.dev._registrations = TokenBucket(REGISTRATION_RATE_PER_S, REGISTRATION_BURST, clock=lambda: now[0])
    for _ in range(REGISTRATION_BURST):
        assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
        bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
    assert bar.negotiate() == C.PVSCHED_STATUS_AGAIN and bar.dev.active is None
    now[0] += 1 / REGISTRATION_RATE_PER_S
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE and bar.dev.active is not None
    bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
    assert bar.negotiate() == C.PVSCHED_STATUS_AGAIN, "a second registration within the same token's time"


def test_concurrent_vcpu_accesses(bar: Bar) -> None:
    """vCPU threads hammer BAR0 together; every ENABLE/DISABLE lands in a consistent state."""
    bar.dev._registrations = TokenBucket(1e9, 10**9)  # ENABLEs from every thread: not the rate limit's test
    errors: list[BaseException] = []

    def vcpu(i: int) -> None:
        try:
            for _ in range(300):
                assert bar.read("MAGIC") == C.PVSCHED_MAGIC
                s = bar.negotiate()
                assert s in (C.PVSCHED_STATUS_ACTIVE, C.PVSCHED_STATUS_BUSY, C.PVSCHED_STATUS_IDLE)
                bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert bar.status() == C.PVSCHED_STATUS_IDLE and bar.dev.active is None
    assert bar.negotiate() == C.PVSCHED_STATUS_ACTIVE


def test_constructor_refuses_bad_options() -> None:
    with pytest.raises(PvschedConfigError, match="host features"):
        PvschedDevice(host_features=0x40)
    with pytest.raises(PvschedConfigError, match="host version"):
        PvschedDevice(host_version=1 << 32)
    with pytest.raises(PvschedConfigError, match="boost_prio"):
        PvschedDevice(tunables={"boost_prio": "99"})
    with pytest.raises(PvschedConfigError, match="no_such_tunable"):
        PvschedDevice(tunables={"no_such_tunable": "1"})
    assert PvschedDevice(tunables={"boost_prio": "9"}).tunables == {"boost_prio": "9"}


@pytest.fixture(scope="module")
def big_vm() -> StandinVm:
    """RAM on both sides of the MMIO hole (3 GiB + 64 MiB; the memfd is sparse)."""
    m = StandinVm(nr_vcpus=4, mem_mib=3 * 1024 + 64)
    yield m
    m.close()


def _oracle(gpa: int, size: int, nr_vcpus: int, mem: int) -> int:
    """Independent statement of the BAR0 table's GPA/size rules."""
    if gpa % 4096:
        return C.PVSCHED_STATUS_BAD_GPA
    if size % 4096 or size < 64 + 128 * nr_vcpus:
        return C.PVSCHED_STATUS_TOO_SMALL
    low = min(mem, 3 * GIB)
    in_low = gpa + size <= low
    in_high = gpa >= HIGH_RAM_START and gpa + size <= HIGH_RAM_START + (mem - low)
    return C.PVSCHED_STATUS_ACTIVE if in_low or in_high else C.PVSCHED_STATUS_BAD_GPA


_edges = [0, 4096, 3 * GIB - 8192, 3 * GIB - 4096, 3 * GIB, 4 * GIB - 4096, 4 * GIB, 4 * GIB + 60 * MIB,
          4 * GIB + 64 * MIB - 4096, 4 * GIB + 64 * MIB, (1 << 64) - 4096]


@settings(max_examples=300, deadline=None)
@given(gpa=st.one_of(st.sampled_from(_edges), st.integers(0, (1 << 64) - 1),
                     st.integers(0, 5 * GIB).map(lambda x: x & ~0xFFF)),
       size=st.one_of(st.sampled_from([0, 4096, 8192, 64 * 1024, 2 * MIB, 5000]), st.integers(0, (1 << 32) - 1)))
def test_gpa_validation_matches_the_table(big_vm: StandinVm, gpa: int, size: int) -> None:
    dev = PvschedDevice(policy=False)
    dev.attach(big_vm)
    b = Bar(dev)
    got = b.negotiate(gpa=gpa, size=size)
    assert got == _oracle(gpa, size, 4, big_vm.memory.size)
    if got == C.PVSCHED_STATUS_ACTIVE:
        assert dev.active is not None and dev.active["hva"] == big_vm.memory.hva(gpa, size)
