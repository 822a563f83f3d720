"""The human text of `pyvmm status` and `pyvmm policy show|set`, from the control replies' data.

The VM's control socket answers with data only (what `--json` prints); this module is the one
place that turns it into lines for people.  The policy engine may supply its own "text" for
`policy show`, which is shown as it is.
"""

from __future__ import annotations

from typing import Any

from pyvmm.common.procfs import format_memory
from pyvmm.device.device import version_str


def render(cmd: str, reply: dict[str, Any]) -> str | None:
    """The text of a successful reply to control command `cmd` (None: there is none, print the JSON)."""
    if cmd == "status":
        return format_status_reply(reply)
    if cmd == "policy.show":
        return reply.get("text") or format_policy_show(reply)
    if cmd == "policy.set":
        return format_policy_set(reply)
    return reply.get("text")


def format_status_reply(reply: dict[str, Any]) -> str | None:
    """The VM's own line (its "text"), then the pvsched device's state if it has one."""
    lines = [reply["text"]] if reply.get("text") else []
    if isinstance(reply.get("pvsched"), dict):
        lines.append(format_status(reply["pvsched"]))
    return "\n".join(lines) or None


def format_status(d: dict[str, Any]) -> str:
    """Human form of the pvsched device's state (PvschedDevice.snapshot(), with the policy process's view)."""
    lines = [(f"pvsched: {d['state']} (STATUS {d['status_name']}), host offers v{version_str(d['host_version'])} "
              f"features {d['host_features']:#x}")]
    if d["state"] == "active":
        lines.append(f"  negotiated v{version_str(d['version'])} features {d['features']:#x} "
                     f"({','.join(d['feature_names']) or 'none'}); shared area GPA {d['shm_gpa']:#x} "
                     f"size {d['shm_size']}")
    p = d["policy"]
    if not p["enabled"]:
        lines.append("  policy: off")
    elif p.get("running"):
        lines.append(f"  policy: process {p['pid']}, " + ("BPF policy loaded" if p["engine"]
                                                         else f"no BPF ({p.get('engine_error')})")
                     + (f"; {format_memory(p['memory'])}" if p.get("memory") else ""))
        view = p.get("process") or {}
        sb = view.get("sandbox")
        if sb:
            lines.append(f"    sandbox: {' '.join(sb['cap_eff'])}, no_new_privs {int(sb['no_new_privs'])}, "
                         f"seccomp {sb['seccomp']}, interfaces {','.join(sb['net_ifaces'])}; "
                         + ("VM registered" if view.get("registered") else "VM not registered"))
        elif "error" in view:
            lines.append(f"    (no answer: {view['error']})")
        lines.append("    " + format_guardian(p.get("guardian")))
    else:
        lines.append(f"  policy: not running ({p.get('error') or 'stopped'}); vCPUs at their original scheduling")
        if p.get("guardian"):
            lines.append("    " + format_guardian(p["guardian"]))
    for v in d["vcpus"]:
        lines.append(f"  vCPU {v['id']}: TID {v['tid']}, now {v.get('sched')}, original {v.get('original')}")
        if "guest" in v:
            lines.append("    " + format_guest(v["guest"]))
            lines.append("    " + format_host(v["host"]))
    return "\n".join(lines)


def format_guardian(g: dict[str, Any] | None) -> str:
    """One line on the guardian thread (pyvmm.device.guardian's info())."""
    if not g:
        return "guardian: none (restores after a policy death rely on Python)"
    prio = f"FIFO {g['prio']}" if g["prio"] else "not real-time"
    live = f"heartbeat {g['beats']}" + (", checked" if g["armed"] else ", not checked")
    text = f"guardian: {g['state']}, {prio}, memory {'locked' if g['locked'] else 'not locked'}, {live}"
    if g.get("cause"):
        text += f"; {g['cause']}: restored {g['restored']} threads"
    if g.get("errors"):
        text += f"; {g['errors']} errors (last: {g['last_error']})"
    return text


def format_guest(g: dict[str, Any] | None) -> str:
    """One-line human form of a guest-area snapshot (pyvmm.abi.slots.read_guest_area)."""
    if g is None:
        return "guest: unreadable (seq kept changing)"
    flags = ",".join(g["flag_names"]) or "-"
    return (f"guest: seq {g['seq']} flags {flags} policy {g['policy_name']} prio {g['rt_priority']} "
            f"nice {g['nice']} wake_hint {g['wake_hint']}")


def format_host(h: dict[str, Any]) -> str:
    """One-line human form of a host-area snapshot (pyvmm.abi.slots.read_host_area)."""
    return (f"host: {h['state_name']} applied {h['policy_name']}:{h['rt_priority']} nice {h['nice']} "
            f"boosts {h['boosts']} throttles {h['throttles']} boosted {h['boosted_ns'] / 1e6:.1f} ms")


def format_policy_show(d: dict[str, Any]) -> str:
    """Generic human form of the engine's show() data, for an engine that supplies no "text" of its own."""
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k} = {v}" for k, v in value.items())
        elif isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"  {item}" for item in value)
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def format_policy_set(d: dict[str, Any]) -> str | None:
    """The tunables after a `policy set`, one "key = value" a line (None when the reply has none)."""
    tun = d.get("tunables")
    if not isinstance(tun, dict):
        return None
    return "\n".join(f"{k} = {v}" for k, v in sorted(tun.items()))
