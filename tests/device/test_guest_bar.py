"""BAR0 from guest code under real KVM: a tiny guest finds the device, refuses its way to ACTIVE, cycles DISABLE/ENABLE.

The guest runs a table of 32-bit MMIO writes to BAR0; after each attempt it reads STATUS and reports it on
I/O port 0x530, so every refusal, its recovery and the DISABLE/ENABLE cycle are seen as the guest sees them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from device_harness import SHM_GPA, C
from tiny_guest import build_guest

from pyvmm.boot import BootConfig, run_vm
from pyvmm.device.device import REG
from pyvmm.vmm.memory import MIB, PCI_MMIO_START

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")

REPORT_PORT = 0x530
MEM_MIB = 64
STATUS_MARK = 0xFFF  # table entry "read STATUS and report it"
END_MARK = 0xFFFFFFFF

# EXIT, PCI_FIND, CFG_W, CFG_R: from the tiny guests' prelude (tests/tiny_guest.py).
GUEST = r"""
_start:
    test %edi, %edi                 # RDI = vCPU id: only vCPU 0 drives the device
    jz vcpu0
park:
    cli
    hlt
    jmp park
vcpu0:
    PCI_FIND 0x70731234             # vendor 0x1234 device 0x7073 on bus 0
    CFG_W 0x4, 2                    # memory decoding on
    CFG_R 0x10
    and $0xfffffff0, %eax
    mov %eax, %edi                  # BAR0 as placed by the VMM
    lea table(%rip), %rsi
next:
    mov (%rsi), %eax
    mov 4(%rsi), %ecx
    add $8, %rsi
    cmp $0xffffffff, %eax
    je done
    cmp $0xfff, %eax
    je report
    mov %ecx, (%rdi,%rax)           # one 32-bit MMIO write
    jmp next
report:
    mov 0x28(%rdi), %eax            # STATUS
    mov $0x530, %dx
    out %eax, %dx
    jmp next
done:
    EXIT 0
.data
.balign 8
table:
"""


def _negotiation(gpa: int = SHM_GPA, size: int = 4096, version: int = C.PVSCHED_VERSION,
                 features: int = C.PVSCHED_F_ALL) -> list[tuple[int, int]]:
    return [(REG["GUEST_VERSION"], version), (REG["GUEST_FEATURES"], features),
            (REG["SHM_GPA_LO"], gpa & 0xFFFFFFFF), (REG["SHM_GPA_HI"], gpa >> 32), (REG["SHM_SIZE"], size),
            (REG["CONTROL"], C.PVSCHED_CTRL_ENABLE), (STATUS_MARK, 0)]


STEPS: list[tuple[str, list[tuple[int, int]], int]] = [
    ("unaligned GPA", _negotiation(gpa=SHM_GPA + 0x10), C.PVSCHED_STATUS_BAD_GPA),
    ("outside RAM", _negotiation(gpa=MEM_MIB * MIB), C.PVSCHED_STATUS_BAD_GPA),
    ("in the MMIO hole", _negotiation(gpa=PCI_MMIO_START), C.PVSCHED_STATUS_BAD_GPA),
    ("wraps", _negotiation(gpa=(1 << 64) - 4096, size=8192), C.PVSCHED_STATUS_BAD_GPA),
    ("too small", _negotiation(size=64), C.PVSCHED_STATUS_TOO_SMALL),
    ("unknown feature", _negotiation(features=1 << 6), C.PVSCHED_STATUS_BAD_FEATURE),
    ("unknown version", _negotiation(version=0x00020000), C.PVSCHED_STATUS_BAD_VERSION),
    ("full negotiation", _negotiation(), C.PVSCHED_STATUS_ACTIVE),
    ("ENABLE while active", [(REG["CONTROL"], C.PVSCHED_CTRL_ENABLE), (STATUS_MARK, 0)], C.PVSCHED_STATUS_BUSY),
    ("DISABLE", [(REG["CONTROL"], C.PVSCHED_CTRL_DISABLE), (STATUS_MARK, 0)], C.PVSCHED_STATUS_IDLE),
    ("ENABLE again", [(REG["CONTROL"], C.PVSCHED_CTRL_ENABLE), (STATUS_MARK, 0)], C.PVSCHED_STATUS_ACTIVE),
    ("unknown offset", [(0x800, 0xFFFFFFFF), (STATUS_MARK, 0)], C.PVSCHED_STATUS_ACTIVE),
]


def _build(tmp_path: Path) -> Path:
    table = "".join(f"    .long {off:#x}, {val & 0xFFFFFFFF:#x}\n" for _, pairs, _ in STEPS for off, val in pairs)
    return build_guest(tmp_path, GUEST + table + f"    .long {END_MARK:#x}, 0\n", "bar_guest")


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_guest_drives_every_refusal_then_disable_enable(tmp_path: Path, policy: bool) -> None:
    reports: list[int] = []
    machines = []

    def setup(m) -> None:
        m.pio.register(REPORT_PORT, 4, lambda o, s: 0, lambda o, s, v: reports.append(v), "report")
        machines.append(m)

    res = run_vm(BootConfig(kernel=_build(tmp_path), mem_mib=MEM_MIB, cpus=2, timeout=60, policy=policy,
                            control_socket=False, setup=[setup]))
    assert res.exit_code == 0, (res.exit_code, res.message, res.console[-1000:])
    got = [struct.unpack("<i", struct.pack("<I", v))[0] for v in reports]
    assert got == [code for _, _, code in STEPS], list(zip([n for n, _, _ in STEPS], got))
    dev = next(d for d in machines[0].devices if d.label == "pvsched")
    assert dev.active is not None and dev.active["gpa"] == SHM_GPA
    if policy:
        assert dev.supervisor is not None and dev.supervisor.returncode == 0  # clean stop after the VM ended
