"""Inside `pyvmm lab` under TCG: turn on, once, the kernel static keys that every pyvmm boot turns on and off.

A static key's flip rewrites kernel text (text_poke_bp(): an int3, then the new bytes), and the lab's
kernel runs under QEMU 7.2's multi-threaded TCG, where a flip of code that the other CPU runs at that
moment hung the lab for good: both CPUs stayed at the patched site in finish_task_switch() (the
preempt notifiers' key, turned on by KVM_CREATE_VM), with soft lockups and RCU stalls and no way out
(docs/linux-lab.md, "A lab that hung at a VM's start").  A pyvmm boot flips a dozen keys at its start
and again at its end: the policy's tracepoints, BPF run-time statistics, and KVM's keys for a VM and
its local APIC.

The lab's script runs this with its other CPUs offline, so that each key is flipped once while only one
CPU runs, and the keys then stay on for the lab's life: an attach or a VM later only counts up and down
above zero, which rewrites no text.  A tracepoint rewrites text at one more count: its static call
jumps straight to its probe while it has one, and to its iterator from two probes on, and every call
site is patched at 1 <-> 2 (tracepoint_add_func() and tracepoint_remove_func()).  One held probe left
each policy attach and detach patching the call sites of sched_process_exit and of the kvm tracepoints
under the other CPU's feet (sched_switch and sched_wakeup have a second probe from ftrace's command-line
recorder while any event is on).  What it holds:
- the ftrace events of the tracepoints the policy and the bench attach to, twice: in the top trace
  array and in a tracefs instance of its own, each with tracing off.  Each array registers its own
  probe, so every tracepoint starts at two, where a BPF attach or detach only moves the count above two.
  Each costs a call that finds its ring buffer off;
- BPF run-time statistics (`kernel.bpf_stats_enabled`, which the policy turns on anyway while it lives);
- a KVM VM with an in-kernel irqchip and one vCPU that never runs (the preempt notifiers' key, and the
  local APIC's hw/sw-disabled keys, which its APIC keeps counted).

The first process sets up, then forks a child that keeps the VM's fds and sleeps until the lab powers
off; the parent exits 0 once everything is held, or 1 with one line on stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pyvmm.vmm import kvm

TRACEFS = Path("/sys/kernel/tracing")
# tp_btf programs of pyvmm/policy/pvsched.bpf.c and pyvmm/bench/bpf/*.bpf.c
EVENTS = ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_wakeup_new", "sched/sched_process_exit",
          "kvm/kvm_exit", "kvm/kvm_entry", "kvm/kvm_vcpu_wakeup", "kvm/kvm_set_irq", "kvm/kvm_apic_accept_irq",
          "kvm/kvm_inj_virq")


INSTANCE = "pyvmm-keys"  # the second trace array, under TRACEFS/instances


def _enable(array: Path) -> None:
    """Tracing off in one trace array, then every event in EVENTS on in it."""
    (array / "tracing_on").write_text("0\n")
    for e in EVENTS:
        (array / "events" / e / "enable").write_text("1\n")


def hold_events(tracefs: Path = TRACEFS) -> None:
    """Every event in EVENTS on, tracing off, in the top trace array and in INSTANCE: two probes on each
    tracepoint (raises OSError naming the file)."""
    if not (tracefs / "tracing_on").exists():
        if subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], stdin=subprocess.DEVNULL).returncode:
            raise OSError(f"cannot mount tracefs on {tracefs}")
    _enable(tracefs)
    inst = tracefs / "instances" / INSTANCE
    inst.mkdir(exist_ok=True)  # tracefs fills it in: its own events/, tracing_on and buffer
    (inst / "buffer_size_kb").write_text("4\n")  # never written to (tracing off): the smallest buffer will do
    _enable(inst)


def hold_vm() -> list[int]:
    """A VM with an in-kernel irqchip and one vCPU that never runs; its fds."""
    k = kvm.Kvm()
    vm = k.create_vm()
    kvm.ioctl(vm, kvm.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
    vcpu = kvm.ioctl(vm, kvm.KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
    return [k.fd, vm, vcpu]


def main() -> int:
    """Hold the keys; exit once a child holds them."""
    try:
        hold_events()
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1\n")
        hold_vm()  # its fds are plain ints: open until this process, and the child below, exit
    except OSError as e:
        print(f"pyvmm lab: cannot hold the kernel's static keys: {e}", file=sys.stderr)
        return 1
    if os.fork() == 0:
        # The child inherits the fds and keeps them until it dies with the lab; the parent's exit closes
        # only its own copies.  Off the script's stdout and stderr, so that vng's pipes can close.
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        while True:
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
