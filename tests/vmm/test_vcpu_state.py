"""vcpu_state's phrases from crafted LAPIC pages and MSRs (pure logic; the real read is in test_cli's timeout)."""

from __future__ import annotations

from pyvmm.vmm import kvm, vcpu_state as vs

TSC_KHZ = 2_000_000  # 2 GHz: 2e6 ticks per ms


def lapic(**regs32: int) -> bytes:
    """A 1 KiB LAPIC page with the given 32-bit registers (name: offset attribute of vcpu_state)."""
    page = bytearray(1024)
    for off, val in regs32.items():
        o = int(off.removeprefix("r"), 16)
        page[o:o + 4] = val.to_bytes(4, "little")
    return bytes(page)


def test_vectors_are_read_from_the_eight_words_of_a_256_bit_register():
    page = lapic(r200=1 << 3, r270=1 << 31)   # IRR word 0 bit 3, word 7 bit 31
    assert vs.vectors(page, vs.APIC_IRR) == [3, 255]
    assert vs.vectors(page, vs.APIC_ISR) == []


def test_timer_phrases():
    deadline_mode = 2 << 17
    assert vs.timer_text(lapic(r320=vs.LVT_MASKED), {}, TSC_KHZ) == "timer masked"
    assert vs.timer_text(lapic(r320=deadline_mode), {0x10: 10, 0x6E0: 0}, TSC_KHZ) == "TSC-deadline timer disarmed"
    due = {vs.MSR_IA32_TSC: 1_000_000, vs.MSR_TSC_DEADLINE: 1_000_000 + 5 * 2_000_000}
    assert vs.timer_text(lapic(r320=deadline_mode), due, TSC_KHZ) == "TSC-deadline timer due in 5.0 ms"
    # the lost wake-up this is for: a halted vCPU whose deadline has passed
    late = {vs.MSR_IA32_TSC: 30 * 2_000_000, vs.MSR_TSC_DEADLINE: 2 * 2_000_000}
    assert vs.timer_text(lapic(r320=deadline_mode), late, TSC_KHZ) == "TSC-deadline timer overdue by 28.0 ms"
    assert vs.timer_text(lapic(r320=deadline_mode), {}, TSC_KHZ) == "TSC-deadline timer (deadline unread)"
    assert vs.timer_text(lapic(), {}, TSC_KHZ) == "timer disarmed"
    assert vs.timer_text(lapic(r380=1000, r390=250), {}, TSC_KHZ) == "timer at 250 of 1000"


def test_state_text_says_what_it_could_not_read():
    page = lapic(r320=vs.LVT_MASKED, r200=1 << 17, r100=1 << 16)   # IRR 17, ISR 16
    assert vs.state_text(1, kvm.KVM_MP_STATE_HALTED, 0x1234, 0x202, page, {}, TSC_KHZ) == \
        "vCPU 1 halted at RIP 0x1234, IF=1, timer masked, IRR 17, ISR 16"
    assert vs.state_text(0, None, None, None, None, {}, 0) == "vCPU 0 ?"
