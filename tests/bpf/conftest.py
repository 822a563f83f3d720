"""Fixtures for the BPF policy tests: a stand-in VMM with real vCPU-like threads, a sandboxed policy child.

Every RT experiment is bounded: the stand-in VMM runs under
`chrt -f 50 timeout` (a watchdog above every boost and the actuator), has its
own alarm(), and is SIGKILLed by PID at teardown; its threads are restored to
SCHED_OTHER at teardown whatever happened to the policy process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakevmm import FakeVmm, fakevmm_binary

from pyvmm.common.artifacts import ensure_built
from pyvmm.common.safe_fs import remove_tree_nofollow

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BPFFS = Path("/sys/fs/bpf")


def _bpffs_mounted() -> bool:
    try:
        return any(line.split()[1] == str(BPFFS) and line.split()[2] == "bpf" for line in open("/proc/mounts"))
    except OSError:
        return False


@pytest.fixture(scope="session")
def bpf_object() -> Path:
    """The policy object, built from source if stale (make -C bpf)."""
    if os.geteuid() != 0:
        pytest.skip("BPF policy tests need root")
    if not _bpffs_mounted():
        pytest.fail("bpffs is not mounted at /sys/fs/bpf (scripts/setup.sh mounts it)")
    return ensure_built("bpf", quiet=True)


@pytest.fixture(scope="session")
def fakevmm_bin(bpf_object) -> Path:
    """tests/standin/fakevmm.c, built by tests/standin/Makefile (scripts/test.sh runs it)."""
    return fakevmm_binary()


@pytest.fixture
def fake_vmm(fakevmm_bin):
    """Start stand-in VMMs: fake_vmm(nthreads=1, max_s=30) -> FakeVmm; all stopped at teardown."""
    vmms: list[FakeVmm] = []

    def start(nthreads: int = 1, max_s: int = 30) -> FakeVmm:
        v = FakeVmm(fakevmm_bin, nthreads, max_s)
        vmms.append(v)
        return v

    yield start
    for v in vmms:
        v.stop()


class PolicyChild:
    """The engine in a child process with only CAP_BPF, CAP_PERFMON, CAP_SYS_NICE, CAP_IPC_LOCK."""

    def __init__(self, vmm: FakeVmm, pin_root: Path, tunables: dict | None, keep_caps: bool = False,
                 features: int = 0, program: str = "pvsched", unprivileged_load: bool = False):
        cfg = {"vmm_pid": vmm.pid, "memfd": vmm.fd, "slot_offset": vmm.info["slot_offset"], "hva": vmm.info["hva"],
               "tids": vmm.tids, "tunables": tunables or {}, "pin_root": str(pin_root), "keep_caps": keep_caps,
               "features": features, "program": program, "unprivileged_load": unprivileged_load}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "policy_child.py"), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     pass_fds=(vmm.fd,))
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"policy child failed to start (exit {self.proc.returncode})")
        self.ready = json.loads(line)
        self.pid = self.proc.pid

    def cmd(self, line: str) -> dict:
        """One command, its JSON reply."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def show(self) -> dict:
        return self.cmd("show")

    def set(self, **kv) -> dict:
        return self.cmd("set " + " ".join(f"{k}={v}" for k, v in kv.items()))

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM and wait: the engine's cleanup path runs."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def pin_root():
    """A pin root of this test's own under /sys/fs/bpf, removed afterwards."""
    root = BPFFS / f"pvsched-test-{os.getpid()}-{time.monotonic_ns()}"
    yield root
    remove_tree_nofollow(root)  # this VM's pins, the host's (host/<policy>/) and the host budget


@pytest.fixture
def policy_child(bpf_object, pin_root):
    """Start the sandboxed policy engine for a FakeVmm: policy_child(vmm, tunables, features=...) -> PolicyChild.

    `features`: the guest's negotiated pvsched features the vCPUs are registered with (default none);
    `program`: the BPF policy by name (pyvmm.policy.programs)."""
    kids: list[PolicyChild] = []

    def start(vmm: FakeVmm, tunables: dict | None = None, keep_caps: bool = False, features: int = 0,
              program: str = "pvsched", unprivileged_load: bool = False) -> PolicyChild:
        c = PolicyChild(vmm, pin_root, tunables, keep_caps, features, program, unprivileged_load)
        kids.append(c)
        return c

    yield start
    for c in kids:
        c.kill()
