"""Where a vCPU stood when its VM was stopped: one phrase per vCPU for a VM that ran out its time.

Read only after the vCPU's thread has left KVM_RUN for good: these ioctls wait for a running vCPU.
"""

from __future__ import annotations

from pyvmm.vmm import kvm

MSR_IA32_TSC = 0x10
MSR_TSC_DEADLINE = 0x6E0
APIC_ISR, APIC_IRR = 0x100, 0x200   # eight 32-bit words each, 16 bytes apart
APIC_LVTT, APIC_TMICT, APIC_TMCCT = 0x320, 0x380, 0x390
LVT_MASKED = 1 << 16
LVTT_TSC_DEADLINE = 2               # LVT timer mode (bits 17-18)
RFLAGS_IF = 1 << 9


def _reg32(regs: bytes, off: int) -> int:
    return int.from_bytes(regs[off:off + 4], "little")


def vectors(regs: bytes, base: int) -> list[int]:
    """The vectors set in the 256-bit LAPIC register (IRR, ISR) at `base`."""
    return [w * 32 + b for w in range(8) for b in range(32) if _reg32(regs, base + w * 16) >> b & 1]


def timer_text(regs: bytes, msrs: dict[int, int], tsc_khz: int) -> str:
    """The LAPIC timer as a phrase: masked, disarmed, or when it fires (TSC deadline) or its count."""
    lvtt = _reg32(regs, APIC_LVTT)
    if lvtt & LVT_MASKED:
        return "timer masked"
    if (lvtt >> 17) & 3 == LVTT_TSC_DEADLINE:
        deadline, tsc = msrs.get(MSR_TSC_DEADLINE), msrs.get(MSR_IA32_TSC)
        if deadline is None or tsc is None or tsc_khz <= 0:
            return "TSC-deadline timer (deadline unread)"
        if deadline == 0:
            return "TSC-deadline timer disarmed"
        ms = (deadline - tsc) / tsc_khz
        return f"TSC-deadline timer due in {ms:.1f} ms" if ms >= 0 else f"TSC-deadline timer overdue by {-ms:.1f} ms"
    initial = _reg32(regs, APIC_TMICT)
    if initial == 0:
        return "timer disarmed"
    return f"timer at {_reg32(regs, APIC_TMCCT)} of {initial}"


def state_text(index: int, mp_state: int | None, rip: int | None, rflags: int | None, regs: bytes | None,
               msrs: dict[int, int], tsc_khz: int) -> str:
    """One vCPU's phrase from what was read of it (None: could not be read)."""
    parts = [f"vCPU {index} {kvm.MP_STATE_NAMES.get(mp_state, '?') if mp_state is not None else '?'}"]
    parts[0] += f" at RIP {rip:#x}" if rip is not None else ""
    if rflags is not None:
        parts.append(f"IF={int(bool(rflags & RFLAGS_IF))}")
    if regs is not None:
        parts.append(timer_text(regs, msrs, tsc_khz))
        for name, base in (("IRR", APIC_IRR), ("ISR", APIC_ISR)):
            if found := vectors(regs, base):
                parts.append(f"{name} {','.join(str(v) for v in found)}")
    return ", ".join(parts)


def describe(v: kvm.Vcpu) -> str:
    """Read vCPU v's state (its thread stopped) and give it as one phrase."""
    def read(fn):
        try:
            return fn()
        except kvm.KvmError:
            return None

    regs = read(v.get_regs)
    lapic = read(v.get_lapic)
    return state_text(v.index, read(v.get_mp_state), regs.rip if regs else None, regs.rflags if regs else None,
                      bytes(lapic.regs) if lapic else None,
                      read(lambda: v.get_msrs([MSR_IA32_TSC, MSR_TSC_DEADLINE])) or {}, read(v.tsc_khz) or 0)
