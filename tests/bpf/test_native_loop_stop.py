"""The native loops' stop is safe from several threads at once: no second join of one thread, no hang."""

from __future__ import annotations

import subprocess
import sys

# Each round races two stops of each native loop.  The actuator's: its loop ends (stopped from outside, as
# test_engine_run_fails_loudly_when_the_native_actuator_stops does), so Python's watcher stops it while this
# thread's stop() does too.  The backstop loop's: two threads call stop() behind a barrier.  Before the fix
# one round in five of the former joined the thread twice, and the second pthread_join waited forever.
RACE = r"""
import sys, threading
from pyvmm.policy.engine import PolicyEngine

vmm_pid, pin_root, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
eng = PolicyEngine(vmm_pid, {}, pin_root, realtime=False)
act = eng._actuator
try:
    for _ in range(rounds):
        act.start()
        act._lib.pvsched_actuator_loop_stop(act._loop)
        act.stop()
        assert not act.info()["running"], "the actuator loop still runs after stop()"
        act.loop.start(20, 0)
        barrier = threading.Barrier(2)

        def stop():
            barrier.wait()
            act.loop.stop()

        other = threading.Thread(target=stop)
        other.start()
        stop()
        other.join()
        assert not act.loop.info()["running"], "the backstop loop still runs after two stops"
finally:
    eng.close()
print("rounds", rounds)
"""


def test_concurrent_stops_of_the_native_loops_return(fake_vmm, bpf_object, pin_root):
    vmm = fake_vmm(1)
    rounds = 100
    # subprocess.run SIGKILLs the child by its PID when the timeout passes
    try:
        p = subprocess.run([sys.executable, "-I", "-c", RACE, str(vmm.pid), str(pin_root), str(rounds)], cwd="/",
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        raise AssertionError(f"a stop of a native loop hung (a thread joined twice?); stderr: {err[-2000:]}") from None
    assert p.returncode == 0 and p.stdout.split() == ["rounds", str(rounds)], f"rc {p.returncode}: {p.stderr[-2000:]}"
