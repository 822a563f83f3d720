"""Tiny guests on real /dev/kvm: PIO/MMIO dispatch, parallel vCPUs, interrupts, UART console."""

from __future__ import annotations

import threading
import time

from pyvmm.boot import BootConfig, run_vm
from pyvmm.vmm.machine import Machine


def cfg(kernel, setup=(), **kw) -> BootConfig:
    """A BootConfig for tiny guests: no pvsched device, no control socket, a safety timeout."""
    kw.setdefault("timeout", 30)
    kw.setdefault("cpus", 1)
    return BootConfig(kernel=kernel, pvsched=False, control_socket=False, setup=list(setup), **kw)


IO_GUEST = r"""
_start:
    mov $0x500, %dx
    mov $0x11, %al
    out %al, %dx
    mov $0x502, %dx
    mov $0x2233, %ax
    out %ax, %dx
    mov $0x504, %dx
    mov $0x44556677, %eax
    out %eax, %dx
    mov $0x500, %dx
    in %dx, %al
    cmp $0xa5, %al
    jne fail1
    in %dx, %ax
    cmp $0xbeef, %ax
    jne fail2
    in %dx, %eax
    cmp $0xdeadbeef, %eax
    jne fail3
    mov $0xd0000000, %edi
    movb $0x12, 0x10(%rdi)
    movw $0x3456, 0x20(%rdi)
    movl $0x789abcde, 0x30(%rdi)
    movabs $0x0102030405060708, %rax
    movq %rax, 0x40(%rdi)
    movb 0x8(%rdi), %al
    cmp $0x88, %al
    jne fail4
    movw 0x8(%rdi), %ax
    cmp $0x7788, %ax
    jne fail5
    movl 0x8(%rdi), %eax
    cmp $0x55667788, %eax
    jne fail6
    movq 0x8(%rdi), %rax
    movabs $0x1122334455667788, %rbx
    cmp %rbx, %rax
    jne fail7
    EXIT 0
fail1: EXIT 11
fail2: EXIT 12
fail3: EXIT 13
fail4: EXIT 14
fail5: EXIT 15
fail6: EXIT 16
fail7: EXIT 17
"""


def test_pio_and_mmio_reach_the_right_device_with_size_and_data(guest):
    pio_log, mmio_log = [], []
    pio_values = {1: 0xA5, 2: 0xBEEF, 4: 0xDEADBEEF}

    def setup(m: Machine) -> None:
        m.pio.register(0x500, 8, lambda o, s: pio_log.append(("r", o, s)) or pio_values[s],
                       lambda o, s, v: pio_log.append(("w", o, s, v)), "test-pio")
        m.mmio.register(0xD000_0000, 0x1000, lambda o, s: mmio_log.append(("r", o, s)) or 0x1122334455667788,
                        lambda o, s, v: mmio_log.append(("w", o, s, v)), "test-mmio")

    r = run_vm(cfg(guest(IO_GUEST), [setup]))
    assert r.exit_code == 0, r.message
    assert pio_log == [("w", 0, 1, 0x11), ("w", 2, 2, 0x2233), ("w", 4, 4, 0x44556677),
                       ("r", 0, 1), ("r", 0, 2), ("r", 0, 4)]
    assert mmio_log == [("w", 0x10, 1, 0x12), ("w", 0x20, 2, 0x3456), ("w", 0x30, 4, 0x789ABCDE),
                        ("w", 0x40, 8, 0x0102030405060708), ("r", 8, 1), ("r", 8, 2), ("r", 8, 4), ("r", 8, 8)]


PARALLEL_GUEST = r"""
_start:
    mov $0x510, %dx
    mov %edi, %eax
    out %eax, %dx
    mov $150000, %ecx
1:  dec %ecx
    jnz 1b
    mov $0x511, %dx
    mov %edi, %eax
    out %eax, %dx
2:  cli
    hlt
    jmp 2b
"""


def test_two_vcpus_run_at_the_same_time_on_distinct_threads(guest):
    """KVM_RUN releases the GIL: both vCPUs are inside their spin loop at once, on their own TIDs."""
    starts, ends, tids = {}, {}, {}

    def setup(m: Machine) -> None:
        def start(o, s, v):
            starts[v] = time.monotonic()
            tids[v] = threading.get_native_id()

        def end(o, s, v):
            ends[v] = time.monotonic()
            if len(ends) == 2:
                m.request_stop(0)
        m.pio.register(0x510, 1, lambda o, s: 0, start, "start")
        m.pio.register(0x511, 1, lambda o, s: 0, end, "end")
        setup.machine = m

    r = run_vm(cfg(guest(PARALLEL_GUEST), [setup], cpus=2))
    m = setup.machine
    assert r.exit_code == 0, r.message
    assert sorted(starts) == sorted(ends) == [0, 1]
    assert tids[0] != tids[1]
    assert m.vcpu_tids == tids  # the exit handlers ran on the recorded vCPU threads
    assert set(m.original_sched) == set(tids.values())
    # Overlap: the later vCPU started its loop before the earlier one finished.
    assert max(starts.values()) < min(ends.values()), (starts, ends)


IRQ_GUEST = r"""
_start:
    lea handler(%rip), %rax
    lea idt(%rip), %rdi
    add $0x300, %rdi            # vector 0x30, 16-byte gates
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    lidt idtr(%rip)
    mov $0xff, %al              # mask both PICs: the IOAPIC delivers
    out %al, $0x21
    out %al, $0xa1
    mov $0xfee000f0, %edi       # LAPIC SVR: software enable
    movl $0x1ff, (%rdi)
    mov $0xfec00000, %edi       # IOAPIC pin 5 -> vector 0x30, fixed, edge, APIC 0
    movl $0x1a, (%rdi)
    movl $0x30, 0x10(%rdi)
    movl $0x1b, (%rdi)
    movl $0, 0x10(%rdi)
    mov $0x520, %dx
    out %al, %dx                # "about to halt"
    sti
    hlt
    EXIT 1                      # woke up without the interrupt
handler:
    EXIT 42
.balign 16
idt: .fill 256*16, 1, 0
idtr: .word 256*16-1
      .quad idt
"""


def test_irq_line_through_in_kernel_irqchip_wakes_a_halted_vcpu(guest):
    seen = {}

    def setup(m: Machine) -> None:
        def fire() -> None:
            tid = m.vcpu_tids[0]
            with open(f"/proc/self/task/{tid}/stat") as f:
                seen["state"] = f.read().rsplit(")", 1)[1].split()[0]
            # One rising edge is the interrupt (the pin is edge-triggered).  No lowering after it: the
            # guest exits as soon as the interrupt lands, and the VM is closed under this thread.
            m.irq_line(5, 1)

        def ready(o, s, v) -> None:
            t = threading.Timer(0.3, fire)
            t.daemon = True
            t.start()
        m.pio.register(0x520, 1, lambda o, s: 0, ready, "ready")

    r = run_vm(cfg(guest(IRQ_GUEST), [setup], cpus=1))
    assert seen.get("state") == "S"  # the vCPU thread slept in the kernel: halted, not spinning
    assert r.exit_code == 42, r.message


UART_GUEST = r"""
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  EXIT 0
msg: .asciz "plain line\n{\"type\":\"hello\",\"vcpu\":0}\nnot json {\n"
"""


def test_uart_output_reaches_the_console_and_records(guest):
    r = run_vm(cfg(guest(UART_GUEST)))
    assert r.exit_code == 0
    assert "plain line\n" in r.console
    assert r.records == [{"type": "hello", "vcpu": 0}]


BAD_PORT_GUEST = r"""
_start:
    mov $0x540, %dx
    out %al, %dx
    EXIT 0
"""


def test_a_vmm_bug_in_an_exit_handler_ends_the_vm_with_one_line(guest):
    def setup(m: Machine) -> None:
        m.pio.register(0x540, 1, lambda o, s: 0, lambda o, s, v: 1 // 0, "buggy")

    r = run_vm(cfg(guest(BAD_PORT_GUEST), [setup]))
    assert r.exit_code == 125
    assert r.message.startswith("vCPU 0: VMM error handling KVM_EXIT_IO (out port 0x540, 1 bytes)")
    assert "ZeroDivisionError" in r.message and "RIP 0x" in r.message and "\n" not in r.message


UART_IRQ_GUEST = r"""
_start:
    lea handler(%rip), %rax
    lea idt(%rip), %rdi
    add $0x310, %rdi            # vector 0x31
    mov %ax, (%rdi)
    movw $0x10, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shr $16, %rax
    mov %ax, 6(%rdi)
    shr $16, %rax
    mov %eax, 8(%rdi)
    lidt idtr(%rip)
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xfee000f0, %edi
    movl $0x1ff, (%rdi)
    mov $0xfec00000, %edi       # IOAPIC pin 4 (COM1) -> vector 0x31
    movl $0x18, (%rdi)
    movl $0x31, 0x10(%rdi)
    movl $0x19, (%rdi)
    movl $0, 0x10(%rdi)
    mov $0x3f9, %dx             # IER: RX data interrupts
    mov $0x01, %al
    out %al, %dx
    mov $0x550, %dx
    out %al, %dx                # host: feed a byte
1:  sti
    hlt
    jmp 1b
handler:
    incl count(%rip)
    cmpl $1, count(%rip)
    jne second
    mov $0x3fa, %dx
    in %dx, %al
    cmp $0x04, %al              # IIR: RX data
    jne fail11
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'Z', %al
    jne fail12
    mov $0x3fa, %dx
    in %dx, %al
    cmp $0x01, %al              # IIR: nothing pending
    jne fail13
    mov $0xfee000b0, %edi       # EOI
    movl $0, (%rdi)
    mov $0x3f9, %dx             # IER: THR empty interrupts -> fires at once
    mov $0x02, %al
    out %al, %dx
    iretq
second:
    mov $0x3fa, %dx
    in %dx, %al
    cmp $0x02, %al              # IIR: THR empty
    jne fail14
    EXIT 42
fail11: EXIT 11
fail12: EXIT 12
fail13: EXIT 13
fail14: EXIT 14
count: .long 0
.balign 16
idt: .fill 256*16, 1, 0
idtr: .word 256*16-1
      .quad idt
"""


def test_uart_rx_and_thre_interrupts_arrive_on_irq4(guest):
    def setup(m: Machine) -> None:
        m.pio.register(0x550, 1, lambda o, s: 0, lambda o, s, v: m.uart.feed(b"Z"), "feed")

    r = run_vm(cfg(guest(UART_IRQ_GUEST), [setup]))
    assert r.exit_code == 42, r.message
