"""One set of policy programs per host: shared by every VM, each VM's state its own, gone with the last VM.

Attacks the boundary the shared set adds: a policy process must hold fds of its own VM's maps only (so
whatever it writes, it writes to its own VM), and a syscall program run by a process that serves no VM
must act on nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

from sched_observe import observed, wait_for

from pyvmm.common import libbpf
from pyvmm.policy import host_programs, programs
from pyvmm.policy.policy_types import consts
from pyvmm.policy.policy_types import ffi as pffi

RR, OTHER = os.SCHED_RR, os.SCHED_OTHER


def _bpftool(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)


def _attached(child) -> dict[str, int]:
    return {p["name"]: p["id"] for p in child.show()["programs"] if p["status"] == "attached"}


def _links_of(prog_id: int) -> int:
    return sum(1 for link in _bpftool("link", "show") if link.get("prog_id") == prog_id)


def _held(pid: int) -> dict[str, dict[int, int]]:
    """The BPF objects process `pid` holds fds of: {"map_id"|"prog_id"|"link_id": {id: file flags}}."""
    out: dict[str, dict[int, int]] = {"map_id": {}, "prog_id": {}, "link_id": {}}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        for kind, ids in out.items():
            if kind in fields:
                ids[int(fields[kind])] = int(fields["flags"], 8)
    return out


def _shared_ids(pin_root: Path) -> dict[str, int]:
    """IDs of the host's shared maps (outer maps, policy_vm, host_ids)."""
    folder = host_programs.host_dir(pin_root, programs.object_path("pvsched"))
    return {name: _bpftool("map", "show", "pinned", str(folder / name))["id"] for name in host_programs.SHARED_MAPS}


def _vm_map_ids(pin_root: Path, vmm_pid: int) -> set[int]:
    """IDs of VMM `vmm_pid`'s own maps, as the host's outer maps hold them."""
    fds = host_programs.open_shared(host_programs.host_dir(pin_root, programs.object_path("pvsched")))
    try:
        ids, slot, value = set(), pffi().new("__u32 *"), pffi().new("__u32 *")
        assert libbpf.lib().bpf_map_lookup_elem(fds["vm_slot"], pffi().new("__u32 *", vmm_pid), slot) == 0
        for name in host_programs.OUTER_MAPS.values():
            assert libbpf.lib().bpf_map_lookup_elem(fds[name], slot, value) == 0, name
            ids.add(value[0])
        return ids
    finally:
        for fd in fds.values():
            os.close(fd)


def test_two_vms_share_one_set_of_programs_and_the_last_one_out_detaches_it(fake_vmm, policy_child, pin_root):
    vmm1, vmm2 = fake_vmm(1), fake_vmm(1)
    first = policy_child(vmm1)
    second = policy_child(vmm2)
    progs = _attached(first)
    assert _attached(second) == progs, "the second VM loaded programs of its own"
    assert first.show()["shared"] is False and second.show()["shared"] is True
    assert _links_of(progs["pvs_switch"]) == 1, "more than one sched_switch link on the host"
    for vmm in (vmm1, vmm2):
        vmm.cmd("mode 0 idle")
    assert wait_for(lambda: observed(vmm1.tids[0])[0] == RR and observed(vmm2.tids[0])[0] == RR, 1.0), \
        "a VM was not served by the shared programs"
    # the first VM ends (its VMM takes its entries out): the programs stay for the second, which still works
    assert first.terminate() == 0
    host_programs.leave(vmm1.pid, first.pid, pin_root)
    assert observed(vmm1.tids[0]) == (OTHER, 0, 0)
    assert _links_of(progs["pvs_switch"]) == 1, "the first VM's end detached the second VM's programs"
    vmm2.cmd("mode 0 busy")
    assert wait_for(lambda: observed(vmm2.tids[0])[0] == OTHER, 1.0)
    vmm2.cmd("mode 0 idle")
    assert wait_for(lambda: observed(vmm2.tids[0])[0] == RR, 1.0), "the second VM lost its policy"
    assert host_programs.host_dir(pin_root, programs.object_path("pvsched")).is_dir()
    # the last policy process dies by SIGKILL: no pin holds a link, so the programs go with it
    second.kill()
    live = {p["id"] for p in _bpftool("prog", "show")}
    assert wait_for(lambda: not set(progs.values()) & {p["id"] for p in _bpftool("prog", "show")}, 2.0, 0.05), \
        f"programs outlived the last policy process: {set(progs.values()) & live}"
    os.sched_setscheduler(vmm2.tids[0], OTHER, os.sched_param(0))  # the VMM's job after a SIGKILL
    host_programs.leave(vmm2.pid, second.pid, pin_root)
    assert not host_programs.host_dir(pin_root, programs.object_path("pvsched")).exists(), "the last VM out left the host's pins"


def test_vms_that_start_at_once_load_one_set_and_that_end_at_once_remove_it(fake_vmm, policy_child, pin_root):
    vmms = [fake_vmm(1) for _ in range(3)]
    children: list = [None] * len(vmms)

    def start(i: int) -> None:
        children[i] = policy_child(vmms[i])

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(vmms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(children), "a policy child did not start"
    sets = {tuple(sorted(_attached(c).items())) for c in children}
    assert len(sets) == 1, f"VMs that started at once loaded {len(sets)} sets of programs"
    assert sorted(c.show()["shared"] for c in children) == [False, True, True]
    # and end at once: their VMMs leave together, and the last one out removes the host's pins
    for c in children:
        c.proc.terminate()
    for c in children:
        assert c.proc.wait(10) == 0
    errors: list[BaseException] = []

    def leave(i: int) -> None:
        try:
            host_programs.leave(vmms[i].pid, children[i].pid, pin_root)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=leave, args=(i,)) for i in range(len(vmms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert not host_programs.host_dir(pin_root, programs.object_path("pvsched")).exists(), "VMs that ended at once left the host's pins"


def test_a_policy_process_holds_fds_of_its_own_vms_maps_only(fake_vmm, policy_child, pin_root):
    vmm1, vmm2 = fake_vmm(1), fake_vmm(1)
    children = {vmm1.pid: policy_child(vmm1), vmm2.pid: policy_child(vmm2)}
    shared = set(_shared_ids(pin_root).values())
    budget = _bpftool("map", "show", "pinned", str(pin_root / "host_budget"))["id"]
    own = {pid: _vm_map_ids(pin_root, pid) for pid in children}
    assert not own[vmm1.pid] & own[vmm2.pid], "two VMs share a map"
    for pid, child in children.items():
        held = _held(child.pid)
        maps = set(held["map_id"])
        assert not maps & shared, f"policy process {child.pid} holds the host's shared maps {maps & shared}"
        assert maps <= own[pid] | {budget}, f"policy process {child.pid} holds maps not its VM's: " \
                                            f"{maps - own[pid] - {budget}}"
        assert own[pid] <= maps, "the policy process lost a map of its own VM"
        assert held["map_id"][budget] & 0o3 == os.O_RDONLY, "the host budget's fd is writable"
        assert held["link_id"], "the policy process holds no link: the programs would not outlive the first VM"
    for child in children.values():
        child.terminate()


def test_the_entries_of_a_vm_that_died_without_leaving_go_at_the_next_start(fake_vmm, policy_child, pin_root):
    gone_vmm = fake_vmm(1)
    gone = policy_child(gone_vmm)
    gone.kill()
    gone_vmm.stop()  # no VMM is left to take its entries out
    assert wait_for(lambda: not os.path.exists(f"/proc/{gone_vmm.pid}"), 2.0)
    vmm = fake_vmm(1)
    child = policy_child(vmm)
    fds = host_programs.open_shared(host_programs.host_dir(pin_root, programs.object_path("pvsched")))
    try:
        assert host_programs.map_keys(fds["vm_slot"]) == [vmm.pid], "a dead VMM's entries survived the next start"
        value = pffi().new("__u32 *")
        slots = [i for i in range(consts().PVSCHED_MAX_VMS)
                 if libbpf.lib().bpf_map_lookup_elem(fds["vm_vcpus"], pffi().new("__u32 *", i), value) == 0]
        assert len(slots) == 1, f"a dead VMM's maps are still in the outer map at slots {slots}"
        assert host_programs.map_keys(fds["policy_vm"]) == [child.pid]
    finally:
        for fd in fds.values():
            os.close(fd)
    child.terminate()


def test_a_syscall_program_run_by_a_process_that_serves_no_vm_acts_on_nothing(fake_vmm, policy_child, pin_root):
    vmm = fake_vmm(1)
    child = policy_child(vmm, {"backstop_ms": "1000"})
    ids = {p["name"]: p["id"] for p in child.show()["programs"]}
    before = child.show()["stats"]["backstop"]["value"]
    lib, f = libbpf.lib(), libbpf.ffi()
    for name in ("pvs_backstop", "pvs_clock_start"):
        fd = lib.bpf_prog_get_fd_by_id(ids[name])
        assert fd >= 0
        try:
            ctx = pffi().new("struct pvsched_backstop_ctx *", {"tid": vmm.tids[0], "slot_uaddr": 4096})
            opts = f.new("struct bpf_test_run_opts *")
            opts.sz = f.sizeof("struct bpf_test_run_opts")
            opts.ctx_in, opts.ctx_size_in = ctx, pffi().sizeof("struct pvsched_backstop_ctx")
            if name == "pvs_clock_start":
                opts.ctx_in, opts.ctx_size_in = f.NULL, 0
            assert lib.bpf_prog_test_run_opts(fd, opts) == 0
            # this process is in no VM's policy_vm entry: the program finds no VM and returns -1
            assert f.cast("int32_t", opts.retval) == -1, f"{name} acted for a process that serves no VM"
        finally:
            os.close(fd)
    assert child.show()["stats"]["backstop"]["value"] - before <= 1, "the foreign backstop run was counted"
    child.terminate()


def test_a_vm_of_another_build_loads_a_set_of_its_own(fake_vmm, bpf_object, pin_root, tmp_path):
    """After an upgrade, a new build's VM must not join programs whose maps may have another layout."""
    from pyvmm.policy.loader import BpfPolicy
    from pyvmm.policy.tunables import parse

    other = tmp_path / "pvsched.bpf.o"
    other.write_bytes(programs.object_path("pvsched").read_bytes() + b"\0" * 8)  # another build: another digest
    vmm1, vmm2 = fake_vmm(1), fake_vmm(1)
    old = BpfPolicy(programs.object_path("pvsched"), vmm1.pid, pin_root / str(vmm1.pid))
    new = BpfPolicy(other, vmm2.pid, pin_root / str(vmm2.pid))
    try:
        old.open_load_attach(parse(None))
        new.open_load_attach(parse(None))
        assert not old.shared and not new.shared, "a VM of another build joined the older set"
        assert host_programs.host_dir(pin_root, other) != host_programs.host_dir(pin_root, programs.object_path("pvsched"))
        assert host_programs.host_dir(pin_root, other).is_dir()
        assert old.programs["pvs_switch"].fd >= 0 and new.programs["pvs_switch"].fd >= 0
    finally:
        old.close()
        new.close()
    assert not any(host_programs.host_root(pin_root).iterdir()), "the two sets' pins outlived their VMs"


_BY_ID = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from policy_child import drop_caps
drop_caps()  # the sandbox's capabilities: CAP_BPF, CAP_PERFMON, CAP_SYS_NICE, CAP_IPC_LOCK
from pyvmm.common import libbpf
out = {}
for name, map_id in json.loads(sys.argv[2]).items():
    fd = libbpf.lib().bpf_map_get_fd_by_id(map_id)
    out[name] = libbpf.ffi().errno if fd < 0 else 0
print(json.dumps(out))
"""


def test_with_the_sandboxs_capabilities_the_hosts_maps_cannot_be_taken_by_id(fake_vmm, policy_child, pin_root):
    """A compromised policy process holds no fd of the host's maps, and cannot get one by ID either."""
    import errno
    import sys

    vmm = fake_vmm(1)
    child = policy_child(vmm)
    ids = _shared_ids(pin_root)
    r = subprocess.run([sys.executable, "-I", "-c", _BY_ID, str(Path(__file__).parent), json.dumps(ids)],
                       check=False, capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr[-1000:]
    got = json.loads(r.stdout)
    assert got == dict.fromkeys(ids, errno.EPERM), f"a sandboxed process reached the host's maps: {got}"
    child.terminate()


def test_only_the_programs_write_a_vms_budget_and_clock(fake_vmm, bpf_object):
    """The owner of a VM's maps may read its budget and clock, never write them (BPF_F_RDONLY)."""
    from pyvmm.policy.loader import BpfPolicy
    from pyvmm.policy.tunables import parse

    vmm = fake_vmm(1)
    pol = BpfPolicy(bpf_object, vmm.pid, pin_dir=None)
    try:
        pol.open_load_attach(parse(None))
        lib = libbpf.lib()
        for name in ("vm_budget", "clock"):
            value = pffi().new("char[]", 4096)  # larger than either value: a lookup writes the map's value size
            assert lib.bpf_map_lookup_elem(pol.maps[name], pffi().new("__u32 *", 0), value) == 0, name
            assert lib.bpf_map_update_elem(pol.maps[name], pffi().new("__u32 *", 0), value, libbpf.BPF_ANY) < 0, \
                f"user space wrote the VM's {name}"
    finally:
        pol.close()


def test_a_host_folder_nothing_runs_from_goes_at_the_next_leave(fake_vmm, policy_child, pin_root):
    """A first load that died half-way leaves a folder without maps; a running set's folder stays."""
    from pyvmm.common.safe_fs import ensure_private_dir

    vmm = fake_vmm(1)
    child = policy_child(vmm)
    running = host_programs.host_dir(pin_root, programs.object_path("pvsched"))
    dead = ensure_private_dir(host_programs.host_root(pin_root) / "pvsched-0000000000000000")
    host_programs.leave(vmm.pid + 1_000_000, None, pin_root)  # any VMM's leave sweeps
    assert not dead.exists(), "a folder nothing runs from outlived a leave"
    fds = host_programs.open_shared(running)
    try:
        assert host_programs.map_keys(fds["vm_slot"]) == [vmm.pid], "the running set lost its VM"
    finally:
        for fd in fds.values():
            os.close(fd)
    child.terminate()
