"""The Machine: one KVM VM with its RAM, in-kernel irqchip and PIT, buses, devices and vCPU threads.

Threads: the main thread runs trio (control socket, device tasks, signals,
timeout); each vCPU is a plain thread blocking in KVM_RUN (through ctypes,
so the GIL is released and vCPUs run in parallel) that handles its own
exits.  Stopping: set the stop flag, set kvm_run.immediate_exit and send the
thread a signal, so a vCPU inside KVM_RUN (e.g. halted) returns with EINTR
and sees the flag.  Every vCPU-side error ends the VM with one line naming
the vCPU, the exit and RIP.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import trio

from pyvmm.abi import boot
from pyvmm.common import control_client
from pyvmm.common.lone_error import lone_error
from pyvmm.common.procfs import format_memory, memory_kb
from pyvmm.common.sched_attr import SchedAttr, sched_getattr
from pyvmm.vmm import acpi, control, kvm, vcpu_state, x86
from pyvmm.vmm.acpi_pm import AcpiPm
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.console import Console
from pyvmm.vmm.memory import MIB, GuestMemory, GuestMemoryError
from pyvmm.vmm.pci import PciBus
from pyvmm.vmm.pci_device import PciDevice
from pyvmm.vmm.uart import COM1_BASE, COM1_IRQ, NR_PORTS, Uart16550

log = logging.getLogger("pyvmm")

EXIT_OK = 0
EXIT_BAD_INPUT = 2     # configuration the VMM refuses (no KVM, bad image, too little memory, ...)
EXIT_TIMEOUT = 124     # --timeout expired (as coreutils' timeout)
EXIT_VM_ERROR = 125    # the guest crashed the VM (triple fault, emulation failure, ...)
I8042_CMD_PORT, I8042_RESET = 0x64, 0xFE
KICK_SIGNAL = signal.SIGUSR1
TSS_ADDR = 0xFFFBD000       # three pages below the BIOS area; needed by VMX for real mode (APs)
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_MEM = 64 << 30
CONSOLE_FLUSH_S = 0.1


class VmmError(Exception):
    """A problem the user can fix (no KVM, bad image, bad option); the CLI prints it as one line."""


class Machine:
    """A VM: the pinned device-facing contract (memory, nr_vcpus, vmm_pid, vcpu_tids, original_sched,
    control_handlers, add_pci_device) plus run()."""

    def __init__(self, nr_vcpus: int = 2, mem_mib: int = 256, kvm_device: str = "/dev/kvm",
                 console: Console | None = None):
        if not isinstance(nr_vcpus, int) or nr_vcpus < 1:
            raise VmmError(f"--cpus must be at least 1 (got {nr_vcpus})")
        if nr_vcpus > x86.MAX_VCPUS:
            raise VmmError(f"--cpus {nr_vcpus} is more than pyvmm supports ({x86.MAX_VCPUS})")
        if mem_mib * MIB > MAX_MEM:
            raise VmmError(f"--mem {mem_mib} MiB is more than pyvmm supports ({MAX_MEM // MIB} MiB)")
        self.nr_vcpus = nr_vcpus
        self.vmm_pid = os.getpid()
        self.vcpu_tids: dict[int, int] = {}
        self.original_sched: dict[int, SchedAttr] = {}
        self.control_handlers: dict[str, Callable[[dict], Any]] = {"vm": self._vm_info, "status": self._status}
        self.devices: list[PciDevice] = []
        self.console = console or Console()
        self.exit_code: int | None = None
        self.exit_message: str | None = None
        self.started_at = 0.0
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._stop_requested_at = 0.0
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop_event: trio.Event | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._kick_with_signal = False
        self._vcpus_done = 0
        self.vm_fd = -1
        self.memory: GuestMemory | None = None
        self.vcpus: list[kvm.Vcpu] = []
        try:
            self.kvm = kvm.Kvm(kvm_device)
        except kvm.KvmError as e:
            raise VmmError(e.strerror) from None
        try:
            self._create(nr_vcpus, mem_mib)
        except BaseException:
            self.close()
            raise

    def _create(self, nr_vcpus: int, mem_mib: int) -> None:
        k = self.kvm
        for cap, name in ((kvm.KVM_CAP_IRQCHIP, "in-kernel irqchip"), (kvm.KVM_CAP_USER_MEMORY, "user memory"),
                          (kvm.KVM_CAP_IMMEDIATE_EXIT, "immediate_exit"), (kvm.KVM_CAP_PIT2, "in-kernel PIT")):
            if not k.check_extension(cap):
                raise VmmError(f"{k.path}: KVM lacks the {name} capability")
        max_vcpus = k.check_extension(kvm.KVM_CAP_MAX_VCPUS) or k.check_extension(kvm.KVM_CAP_NR_VCPUS) or 1
        if nr_vcpus > max_vcpus:
            raise VmmError(f"--cpus {nr_vcpus}: KVM allows at most {max_vcpus} vCPUs")
        try:
            self.memory = GuestMemory(mem_mib * MIB)
        except GuestMemoryError as e:
            raise VmmError(str(e)) from None
        except OSError as e:
            raise VmmError(f"cannot allocate {mem_mib} MiB of guest memory: {e.strerror}") from None
        self.vm_fd = k.create_vm()
        for addr, req, name in ((TSS_ADDR, kvm.KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR"),):
            try:
                kvm.ioctl(self.vm_fd, req, addr, name)
            except kvm.KvmError as e:
                log.debug("%s: %s (ignored)", name, e)
        try:
            kvm.ioctl(self.vm_fd, kvm.KVM_SET_IDENTITY_MAP_ADDR, kvm.u64(IDENTITY_MAP_ADDR), "KVM_SET_IDENTITY_MAP_ADDR")
        except kvm.KvmError as e:
            log.debug("KVM_SET_IDENTITY_MAP_ADDR: %s (ignored)", e)
        for r in self.memory.regions:
            kvm.ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION,
                      kvm.kvm_userspace_memory_region(slot=r.slot, flags=0, guest_phys_addr=r.gpa,
                                                      memory_size=r.size, userspace_addr=self.memory.hva(r.gpa)),
                      "KVM_SET_USER_MEMORY_REGION")
        kvm.ioctl(self.vm_fd, kvm.KVM_CREATE_IRQCHIP, name="KVM_CREATE_IRQCHIP")
        kvm.ioctl(self.vm_fd, kvm.KVM_CREATE_PIT2, kvm.kvm_pit_config(flags=kvm.KVM_PIT_SPEAKER_DUMMY),
                  "KVM_CREATE_PIT2")
        mmap_size = k.vcpu_mmap_size()
        supported = k.supported_cpuid()
        for i in range(nr_vcpus):
            v = kvm.Vcpu(self.vm_fd, i, mmap_size)
            self.vcpus.append(v)
            v.set_cpuid2(x86.vcpu_cpuid(supported, i))
            x86.set_lint(v)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.uart = Uart16550(self.console.write, lambda level: self.irq_line(COM1_IRQ, level))
        self.pio.register(COM1_BASE, NR_PORTS, self.uart.io_read, self.uart.io_write, "uart0")
        # The test guest's boot contract: one byte written there is the VM's exit code.
        self.pio.register(boot.C.PVSCHED_TESTGUEST_EXIT_PORT, 1, lambda o, s: 0, self._exit_port_write, "debug-exit")
        self.pio.register(I8042_CMD_PORT, 1, lambda o, s: 0, self._i8042_write, "i8042")
        self.pio.register(0x60, 1, lambda o, s: 0, lambda o, s, v: None, "i8042-data")
        self.acpi_pm = AcpiPm(self._acpi_power)
        self.pio.register(acpi.PM_BASE, acpi.PM_BLOCK_LEN, self.acpi_pm.io_read, self.acpi_pm.io_write, "acpi-pm")
        self.pci = PciBus(self.pio, self.mmio)

    # --- the device-facing contract ---
    def add_pci_device(self, dev: PciDevice) -> None:
        """Plug a PCI device into bus 0 (BARs assigned and decoding) and call its attach(vm)."""
        self.pci.add(dev)
        self.devices.append(dev)
        dev.attach(self)

    def irq_line(self, gsi: int, level: int) -> None:
        """Drive an interrupt line of the in-kernel PIC/IOAPIC (KVM_IRQ_LINE)."""
        kvm.ioctl(self.vm_fd, kvm.KVM_IRQ_LINE, kvm.kvm_irq_level(irq=gsi, level=level), "KVM_IRQ_LINE")

    def signal_msi(self, address: int, data: int) -> int:
        """Inject an MSI (KVM_SIGNAL_MSI); returns >0 when delivered."""
        return kvm.ioctl(self.vm_fd, kvm.KVM_SIGNAL_MSI,
                         kvm.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data),
                         "KVM_SIGNAL_MSI")

    def tsc_khz(self) -> int:
        """Guest TSC frequency from KVM_GET_TSC_KHZ (0 if KVM does not say)."""
        try:
            return self.vcpus[0].tsc_khz()
        except kvm.KvmError:
            return 0

    def set_runnable(self, vcpu: kvm.Vcpu) -> None:
        """Mark a vCPU runnable (an entry state set by the VMM, no INIT/SIPI)."""
        vcpu.set_mp_state(kvm.KVM_MP_STATE_RUNNABLE)

    def _vm_info(self, req: dict) -> dict:
        info = {"pid": self.vmm_pid, "nr_vcpus": self.nr_vcpus,
                "vcpu_tids": {str(k): v for k, v in sorted(self.vcpu_tids.items())},
                "mem": self.memory.size if self.memory else 0}
        tids = ", ".join(f"vCPU {k}: TID {v}" for k, v in sorted(self.vcpu_tids.items()))
        info["text"] = f"VM pid {self.vmm_pid}: {self.nr_vcpus} vCPUs ({tids}), {info['mem'] >> 20} MiB"
        return info

    def _status(self, req: dict) -> dict:
        info = self._vm_info(req)
        info["uptime_s"] = round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0
        info["devices"] = [d.label for d in self.devices]
        info["memory"] = memory_kb(self.vmm_pid)
        info["text"] += f", up {info['uptime_s']:.1f} s, devices: {', '.join(info['devices']) or 'none'}"
        if info["memory"]:
            info["text"] += f"; VMM {format_memory(info['memory'])}"
        return info

    # --- ending the VM ---
    def request_stop(self, code: int, message: str | None = None) -> None:
        """End the VM with this exit code (the first request wins); safe from any thread."""
        with self._stop_lock:
            if self.exit_code is None:
                self.exit_code, self.exit_message = code, message
                self._stop_requested_at = time.monotonic()
            if self._stopping:
                return
            self._stopping = True
        self._kick_vcpus()
        token, ev = self._trio_token, self._stop_event
        if token is not None and ev is not None:
            try:
                token.run_sync_soon(ev.set)
            except trio.RunFinishedError:
                pass

    def _kick_vcpus(self) -> None:
        for v in self.vcpus:
            v.run.immediate_exit = 1
        if not self._kick_with_signal:
            return  # without our handler the signal would kill the process
        me = threading.get_ident()
        for t in self._threads:
            if t.ident is not None and t.ident != me and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def _exit_port_write(self, offset: int, size: int, value: int) -> None:
        self.request_stop(value & 0xFF)

    def _acpi_power(self, kind: str) -> None:
        what = "powered off (ACPI S5)" if kind == "poweroff" else "reset the machine (ACPI reset register)"
        self.request_stop(EXIT_OK, f"guest {what}")

    def _i8042_write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == I8042_RESET:
            self.request_stop(EXIT_OK, "guest reset the machine (i8042)")

    @staticmethod
    def _describe_exit(v: kvm.Vcpu) -> str:
        run = v.run  # still holds the exit being handled: no KVM_RUN since
        reason = run.exit_reason
        if reason == kvm.KVM_EXIT_IO:
            way = "out" if run.io.direction == kvm.KVM_EXIT_IO_OUT else "in"
            return f"{kvm.exit_name(reason)} ({way} port {run.io.port:#x}, {run.io.size} bytes)"
        if reason == kvm.KVM_EXIT_MMIO:
            way = "write" if run.mmio.is_write else "read"
            return f"{kvm.exit_name(reason)} ({way} at {run.mmio.phys_addr:#x}, {run.mmio.len} bytes)"
        return kvm.exit_name(reason)

    def _vcpu_fail(self, v: kvm.Vcpu, what: str) -> None:
        try:
            rip = f"{v.get_regs().rip:#x}"
        except kvm.KvmError:
            rip = "unknown"
        self.request_stop(EXIT_VM_ERROR, f"vCPU {v.index}: {what} at RIP {rip}")

    # --- vCPU threads ---
    def _vcpu_thread(self, v: kvm.Vcpu, ready: threading.Semaphore, go: threading.Event) -> None:
        # Terminal signals belong to the main thread (trio); vCPUs only take the kick.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD})
        self.vcpu_tids[v.index] = threading.get_native_id()
        ready.release()
        go.wait()
        try:
            if not self._stopping:
                self._vcpu_loop(v)
        except Exception as e:  # a VMM bug: one line, the VM ends; details with -v
            log.debug("vCPU %d crashed", v.index, exc_info=True)
            self._vcpu_fail(v, f"VMM error handling {self._describe_exit(v)}: {e!r}")
        with self._stop_lock:
            self._vcpus_done += 1
            all_done = self._vcpus_done == self.nr_vcpus
        if all_done:
            self.request_stop(EXIT_OK, "all vCPUs halted")

    def _vcpu_loop(self, v: kvm.Vcpu) -> None:
        run, fd, run_map = v.run, v.fd, v.run_map
        pio, mmio = self.pio, self.mmio
        while not self._stopping:
            r = kvm.run_raw(fd)
            if r < 0:
                if r in (-errno.EINTR, -errno.EAGAIN):
                    continue
                self._vcpu_fail(v, f"KVM_RUN failed: {os.strerror(-r)}")
                return
            reason = run.exit_reason
            if reason == kvm.KVM_EXIT_IO:
                io = run.io
                port, size, count, off = io.port, io.size, io.count, io.data_offset
                if io.direction == kvm.KVM_EXIT_IO_OUT:
                    for k in range(count):
                        p = off + k * size
                        pio.write(port, size, int.from_bytes(run_map[p:p + size], "little"))
                else:
                    for k in range(count):
                        p = off + k * size
                        run_map[p:p + size] = pio.read(port, size).to_bytes(size, "little")
            elif reason == kvm.KVM_EXIT_MMIO:
                m = run.mmio
                n = m.len
                if n not in (1, 2, 4, 8):
                    self._vcpu_fail(v, f"MMIO access of {n} bytes at {m.phys_addr:#x} (KVM_EXIT_MMIO)")
                    return
                if m.is_write:
                    mmio.write(m.phys_addr, n, int.from_bytes(bytes(m.data)[:n], "little"))
                else:
                    val = mmio.read(m.phys_addr, n).to_bytes(8, "little")
                    for k in range(n):
                        m.data[k] = val[k]
            elif reason == kvm.KVM_EXIT_INTR:
                continue
            elif reason == kvm.KVM_EXIT_HLT:
                # Only without an in-kernel LAPIC; ours halts in the kernel. Treat as "this vCPU is done".
                log.debug("vCPU %d halted (KVM_EXIT_HLT)", v.index)
                return
            elif reason == kvm.KVM_EXIT_SHUTDOWN:
                self._vcpu_fail(v, "triple fault (KVM_EXIT_SHUTDOWN)")
                return
            elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
                sub = run.internal.suberror
                what = kvm.INTERNAL_ERROR_NAMES.get(sub, f"suberror {sub}")
                self._vcpu_fail(v, f"KVM internal error, {what} (KVM_EXIT_INTERNAL_ERROR{kvm.internal_error_detail(run)})")
                return
            elif reason == kvm.KVM_EXIT_FAIL_ENTRY:
                fe = run.fail_entry
                self._vcpu_fail(v, f"VM entry failed, hardware reason {fe.hardware_entry_failure_reason:#x} "
                                   f"on CPU {fe.cpu} (KVM_EXIT_FAIL_ENTRY)")
                return
            elif reason == kvm.KVM_EXIT_SYSTEM_EVENT:
                t = run.system_event.type
                name = kvm.SYSTEM_EVENT_NAMES.get(t, f"type {t}")
                if t in (kvm.SYSTEM_EVENT_SHUTDOWN, kvm.SYSTEM_EVENT_RESET):
                    self.request_stop(EXIT_OK, f"vCPU {v.index}: guest requested {name} (KVM_EXIT_SYSTEM_EVENT)")
                else:
                    self._vcpu_fail(v, f"system event: {name} (KVM_EXIT_SYSTEM_EVENT)")
                return
            else:
                self._vcpu_fail(v, f"unhandled exit {kvm.exit_name(reason)}")
                return

    # --- running ---
    def run(self, timeout: float | None = None, control_socket: bool = True) -> int:
        """Run the VM to its end on this (main) thread; returns the exit code (see exit_message)."""
        try:
            with lone_error():  # a device's VmmError reaches the caller as itself
                trio.run(self._main, timeout, control_socket)
        finally:
            self.console.flush()
        return self.exit_code if self.exit_code is not None else EXIT_OK

    async def _main(self, timeout: float | None, control_socket: bool) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._stop_event = trio.Event()
        if self._stopping:
            self._stop_event.set()
        old_kick = None
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:  # signal handlers can only be set there; elsewhere kicks rely on immediate_exit
            old_kick = signal.signal(KICK_SIGNAL, lambda s, f: None)
            self._kick_with_signal = True
        started: list[PciDevice] = []
        try:
            ready, go = threading.Semaphore(0), threading.Event()
            for v in self.vcpus:
                t = threading.Thread(target=self._vcpu_thread, args=(v, ready, go), name=f"vcpu{v.index}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
            for _ in self.vcpus:
                ready.acquire()
            for v in self.vcpus:
                tid = self.vcpu_tids[v.index]
                self.original_sched[tid] = sched_getattr(tid)
            async with trio.open_nursery() as nursery:
                if control_socket:
                    path = control_client.socket_path(self.vmm_pid)
                    try:
                        await nursery.start(control.serve, self.control_handlers, path)
                    except OSError as e:
                        raise VmmError(f"control socket {path}: {e.strerror or e}") from None
                for d in self.devices:
                    started.append(d)
                    try:
                        await d.start(self)  # the loop serves the control socket meanwhile
                    except Exception as e:  # noqa: BLE001
                        raise VmmError(f"device {d.label} failed to start: {e}") from None
                    if hasattr(d, "run"):
                        nursery.start_soon(self._run_device, d)
                if main_thread:
                    nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._flush_console)
                self.started_at = time.monotonic()
                go.set()
                with trio.move_on_after(math.inf if timeout is None else timeout) as cs:
                    await self._stop_event.wait()
                if cs.cancelled_caught:
                    self.request_stop(EXIT_TIMEOUT, f"timeout: VM stopped after {timeout:g} s")
                nursery.cancel_scope.cancel()
        finally:
            self.request_stop(EXIT_VM_ERROR, "VMM stopped unexpectedly")  # no-op when already stopping
            go.set()
            for d in reversed(started):
                try:
                    d.stop()
                except Exception as e:  # noqa: BLE001
                    log.warning("device %s: stop failed: %s", d.label, e)
            self._join_vcpus()
            self._add_vcpu_states_to_timeout()
            if old_kick is not None:
                self._kick_with_signal = False
                signal.signal(KICK_SIGNAL, old_kick)

    async def _run_device(self, d: PciDevice) -> None:
        try:
            await d.run(self)
        except trio.Cancelled:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("device %s: run() failed: %s", d.label, e)

    async def _flush_console(self) -> None:
        # A prompt or progress dots without a newline still show up promptly.
        while True:
            await trio.sleep(CONSOLE_FLUSH_S)
            self.console.flush()

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                self.request_stop(128 + signum, f"stopped by {signal.Signals(signum).name}")

    def _add_vcpu_states_to_timeout(self) -> None:
        # A guest that ran out its time: say where each vCPU stood (halted, IF, its timer, pending vectors),
        # on the timeout's own line.  Only once every vCPU thread has left KVM_RUN: the ioctls would wait.
        if self.exit_code != EXIT_TIMEOUT or any(t.is_alive() for t in self._threads):
            return
        # The guest's clock ran on while the devices stopped: a timer "overdue" by less than this came due
        # after the vCPUs had left KVM_RUN.
        after_ms = (time.monotonic() - self._stop_requested_at) * 1000
        states = "; ".join(vcpu_state.describe(v) for v in self.vcpus)
        with self._stop_lock:
            self.exit_message = f"{self.exit_message} (read {after_ms:.0f} ms after the stop: {states})"

    def _join_vcpus(self) -> None:
        deadline = time.monotonic() + 5.0
        for t in self._threads:
            while t.is_alive() and time.monotonic() < deadline:
                self._kick_vcpus()
                t.join(0.05)
            if t.is_alive():
                log.warning("%s did not stop", t.name)

    def close(self) -> None:
        """Release vCPUs, the VM and guest RAM (after run(); idempotent)."""
        if self._closed:
            return
        self._closed = True
        if any(t.is_alive() for t in self._threads):
            return  # a stuck vCPU still uses its kvm_run; the process exit reclaims it
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.vm_fd >= 0:
            # -1, not the old number: a late irq_line() from another thread then fails with EBADF
            # instead of reaching whatever file reuses that number.
            fd, self.vm_fd = self.vm_fd, -1
            os.close(fd)
        if self.memory is not None:
            self.memory.close()
        self.kvm.close()
