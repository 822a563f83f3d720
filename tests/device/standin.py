"""A small stand-in for pyvmm.vmm.machine.Machine (brief contract 1) with real guest memory and real threads.

The threads are "vCPU-like": plain threads blocked on an event, with native TIDs whose scheduling
attributes can be changed and read back, as the policy process and the device do to vCPU threads.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from pyvmm.common.sched_attr import SchedAttr, sched_getattr
from pyvmm.vmm.memory import MIB, GuestMemory


class VcpuLikeThreads:
    """N idle threads whose TIDs stand in for vCPU threads."""

    def __init__(self, n: int) -> None:
        self._stop = threading.Event()
        self.tids: dict[int, int] = {}
        ready = threading.Barrier(n + 1)
        lock = threading.Lock()

        def body(i: int) -> None:
            with lock:
                self.tids[i] = threading.get_native_id()
            ready.wait()
            self._stop.wait()

        self.threads = [threading.Thread(target=body, args=(i,), name=f"vcpu-like-{i}", daemon=True)
                        for i in range(n)]
        for t in self.threads:
            t.start()
        ready.wait()

    def close(self) -> None:
        """Let the threads end and join them."""
        self._stop.set()
        for t in self.threads:
            t.join(5)


class StandinVm:
    """Machine-shaped object: memory, nr_vcpus, vmm_pid, vcpu_tids, original_sched, control_handlers."""

    def __init__(self, nr_vcpus: int = 2, mem_mib: int = 64) -> None:
        self.memory = GuestMemory(mem_mib * MIB)
        self.nr_vcpus = nr_vcpus
        self.vmm_pid = os.getpid()
        self.threads = VcpuLikeThreads(nr_vcpus)
        self.vcpu_tids: dict[int, int] = dict(self.threads.tids)
        self.original_sched: dict[int, SchedAttr] = {tid: sched_getattr(tid) for tid in self.vcpu_tids.values()}
        self.control_handlers: dict[str, Any] = {}
        self.devices: list[Any] = []

    def add_pci_device(self, dev: Any) -> None:
        """Attach a device the way the VMM does (attach now; start later)."""
        self.devices.append(dev)
        dev.attach(self)

    def close(self) -> None:
        """End the threads and free guest memory."""
        self.threads.close()
        self.memory.close()
