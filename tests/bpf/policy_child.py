"""Test stand-in for the policy process: runs PolicyEngine with the sandbox's capabilities, obeys stdin.

As the real one (pyvmm/policy/process.py), it makes the engine while still privileged (a later VM takes
the host's programs by ID, which needs CAP_SYS_ADMIN) and drops to the sandbox's capabilities before any
other thread starts or anything else is read.

argv[1] is a JSON object: vmm_pid, memfd (inherited fd), slot_offset, hva, tids,
tunables, pin_root, keep_caps (bool: skip the capability drop), unprivileged_load (bool: drop them before
the engine is made), program (the BPF policy's name).  Prints JSON
lines: {"ready": ..., "caps": ...} once, then one reply per command:
  show | set K=V ... | remove TID | add TID | close
SIGTERM (or stdin EOF) ends it through the engine's one cleanup path.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import signal
import sys
from pathlib import Path

import trio

# The sandbox the device engineer's policy process runs in keeps exactly these.
CAP_IPC_LOCK, CAP_SYS_NICE, CAP_PERFMON, CAP_BPF = 14, 23, 38, 39
KEEP = (CAP_IPC_LOCK, CAP_SYS_NICE, CAP_PERFMON, CAP_BPF)
PR_CAPBSET_DROP = 24
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_caps(keep: tuple[int, ...] = KEEP) -> None:
    """Keep only `keep` (effective/permitted; bounding set too), as the real sandbox does."""
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
    data = (_CapData * 2)()
    for cap in keep:
        data[cap // 32].effective |= 1 << (cap % 32)
        data[cap // 32].permitted |= 1 << (cap % 32)
    hdr = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def cap_eff() -> int:
    """This process's effective capability mask (from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return -1


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


async def main(cfg: dict) -> None:
    from pyvmm.common.sched_attr import sched_getattr
    from pyvmm.policy.engine import PolicyEngine

    m = mmap.mmap(cfg["memfd"], cfg.get("size", 4096))
    if cfg.get("unprivileged_load"):
        drop_caps()  # the engine made without CAP_SYS_ADMIN: no stats fd of its own, no joining
    engine = PolicyEngine(cfg["vmm_pid"], cfg.get("tunables") or {}, cfg["pin_root"],
                          program=cfg.get("program", "pvsched"))
    if not cfg.get("keep_caps") and not cfg.get("unprivileged_load"):
        drop_caps()

    def add(i: int, tid: int) -> None:
        off = cfg["slot_offset"] + 128 * i
        engine.add_vcpu(cfg.get("vm_id", 1), i, tid, cfg["hva"] + off, memoryview(m)[off:off + 128],
                        sched_getattr(tid), features=cfg.get("features", 0))

    try:
        for i, tid in enumerate(cfg["tids"]):
            add(i, tid)
        emit({"ready": True, "pid": os.getpid(), "caps": cap_eff(), "pin_dir": str(engine.pin_dir)})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.run)

            async def signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(signals)
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                if not line or line.strip() == "close":
                    break
                cmd, *args = line.split()
                try:
                    if cmd == "show":
                        emit(engine.show())
                    elif cmd == "set":
                        emit({"tunables": engine.set_tunables(dict(a.split("=", 1) for a in args))})
                    elif cmd == "remove":
                        engine.remove_vcpu(int(args[0]))
                        emit({"ok": True})
                    elif cmd == "add":  # register a removed vCPU again (a guest's DISABLE + ENABLE)
                        add(cfg["tids"].index(int(args[0])), int(args[0]))
                        emit({"ok": True})
                    else:
                        emit({"error": f"unknown command {cmd}"})
                except ValueError as e:
                    emit({"error": str(e)})
            nursery.cancel_scope.cancel()
    finally:
        engine.close()
        emit({"closed": True})


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, json.loads(sys.argv[1]))
