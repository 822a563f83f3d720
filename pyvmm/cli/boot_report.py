"""The human face of `pyvmm boot`: the guest's JSON records (and the device's final stats) as lines a person reads.

Pure functions of the records (pyvmm/guest/testguest/README.md, "Results") and of
BootResult.device_stats.  live_line() turns one record into a line as it arrives
(configuration, pvsched negotiation, warnings, errors); end_lines() gives, once the
VM has ended, one line per vCPU, in the spirit of cyclictest's summary: latency
p50/p99/max in microseconds, and what the host policy did to the vCPU's thread
(boosts, throttles, boosted time), which only the device knows at the end.
"""

from __future__ import annotations

from pyvmm.abi import feature_names
from pyvmm.device.device import version_str

# Why the device refused an ENABLE, by the STATUS name the guest reports.
REFUSALS = {
    "BAD_GPA": "the shared area's address is not usable guest RAM",
    "TOO_SMALL": "the shared area is too small for the vCPUs",
    "BAD_VERSION": "the device does not speak the guest's version",
    "BAD_FEATURE": "the guest asked for features the device does not offer",
    "BUSY": "the device was already active",
    "AGAIN": "ENABLEs came too often (rate limit)",
    "IDLE": "the device stayed idle",
}


def _uint(v: object, limit: int | None = None) -> int | None:
    """A non-negative integer from a record, at most `limit` (None for anything else: a record is guest output)."""
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (limit is None or v <= limit)
    return v if ok else None  # type: ignore[return-value]


def _word(v: object) -> int | None:
    """A 32-bit register value from a record."""
    return _uint(v, 0xFFFFFFFF)


def _features(bits: object) -> str:
    if (w := _word(bits)) is None:
        return "?"
    return ",".join(feature_names(w)) or "none"


def _version(v: object) -> str:
    return "?" if (w := _word(v)) is None else version_str(w)


def _refusal(name: object) -> str:
    return REFUSALS.get(name, "unknown status") if isinstance(name, str) else "unknown status"


def pvsched_line(rec: dict) -> str:
    """The guest's pvsched record in words: version and features, or why pvsched is off."""
    status = rec.get("status")
    if status == "active":
        return f"pvsched: active, version {_version(rec.get('version'))}, features {_features(rec.get('features'))}"
    if status == "refused":
        reason = rec.get("reason", "?")
        return (f"pvsched: off, refused by the device: {reason} ({_refusal(reason)}); "
                f"the guest asked version {_version(rec.get('version'))}, features {_features(rec.get('features'))}; "
                f"the device offers version {_version(rec.get('host_version'))}, "
                f"features {_features(rec.get('host_features'))}")
    if status == "absent":
        return "pvsched: off, the guest found no pvsched device"
    if status == "disabled":
        return "pvsched: off, the guest was told not to use it (pvsched=0)"
    return f"pvsched: {status}"


def device_pvsched_line(device: dict) -> str:
    """The negotiation as the device saw it at the end (a guest that prints no pvsched record, e.g. Linux)."""
    if device.get("state") == "active":
        return (f"pvsched: active, version {_version(device.get('version'))}, "
                f"features {_features(device.get('features'))}")
    name = device.get("status_name", "?")
    accepted = (device.get("enables") or {}).get("accepted", 0)
    if name != "IDLE":
        return f"pvsched: off, refused by the device: {name} ({_refusal(name)})"
    if accepted:
        return f"pvsched: off at the end (the guest enabled it {accepted} time(s), then turned it off)"
    return "pvsched: off, the guest never enabled the device"


def live_line(rec: dict) -> str | None:
    """The line to show when `rec` arrives, or None for records summed up at the end."""
    t = rec.get("type")
    if t == "config":
        workloads = rec.get("workload")
        workloads = ",".join(str(w) for w in workloads) if isinstance(workloads, list) else str(workloads)
        duration = _num(rec.get("duration_ms"))
        return (f"guest: {rec.get('vcpus', '?')} vCPUs, {'?' if duration is None else f'{duration / 1000:g}'} s, "
                f"interval {rec.get('interval_us', '?')} us, workload {workloads}, timer {rec.get('timer', '?')}")
    if t == "pvsched":
        return pvsched_line(rec)
    if t == "warning":
        return f"guest warning: {rec.get('message', '')}"
    if t == "error":
        exit_code = f" (exit {rec['exit']})" if "exit" in rec else ""
        return f"guest error: {rec.get('message', rec.get('what', ''))}{exit_code}"
    if t == "done" and rec.get("status") != "ok":
        return f"guest: done, status {rec.get('status')}"
    return None


def _num(v: object) -> float | None:
    """A JSON number as float (None for anything else: a record is guest output, trusted for nothing)."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _us(v: object) -> str:
    x = _num(v)
    return f"{x:7.1f} us" if x is not None else "      ? us"


def _latency(rec: dict, named: bool) -> str:
    name = f"{rec.get('workload', '?')}: " if named else ""
    return (f"{name}p50 {_us(rec.get('p50'))}  p99 {_us(rec.get('p99'))}  max {_us(rec.get('max'))}  "
            f"({rec.get('samples', '?')} samples, {rec.get('missed', '?')} missed)")


def _host_counts(boosts: object, throttles: object, boosted_ms: float | None) -> str:
    boosted = "?" if boosted_ms is None else f"{boosted_ms:.1f}"
    return f"boosts {boosts}, throttles {throttles}, boosted {boosted} ms"


def _host_part(vcpu: int, device: dict | None, hosts: dict[int, dict]) -> str | None:
    """Boosts, throttles and boosted time of a vCPU: the device's host area at stop, else the guest's host record."""
    if device is not None:
        if not (device.get("policy") or {}).get("enabled", True):
            return "no host policy"
        for v in device.get("vcpus") or []:
            host = v.get("host")
            if v.get("id") == vcpu and host is not None:
                ns = _num(host.get("boosted_ns"))
                return _host_counts(host.get("boosts", "?"), host.get("throttles", "?"), None if ns is None else ns / 1e6)
    h = hosts.get(vcpu)
    if h is not None:
        us = _num(h.get("boosted_us"))
        return _host_counts(h.get("boosts", "?"), h.get("throttles", "?"), None if us is None else us / 1e3)
    return None


PER_VCPU = ("latency", "workload", "host")


def vcpu_lines(records: list[dict], device_stats: dict) -> list[str]:
    """One line per vCPU: its workload, its latency (p50/p99/max us) and the host's boosts, throttles, boosted time.

    A vCPU with nothing to report (a guest that prints no records, and no pvsched host area) gets no line.
    """
    dev = (device_stats.get("pvsched") or {}).get("device")
    config = next((r for r in records if r.get("type") == "config"), {})
    workloads = [str(w) for w in config.get("workload") or []] if isinstance(config.get("workload"), list) else []
    hosts = {_uint(r.get("vcpu")): r for r in records if r.get("type") == "host"}
    ids = {_uint(r.get("vcpu")) for r in records if r.get("type") in PER_VCPU}
    ids.update(_uint(v.get("id")) for v in (dev or {}).get("vcpus") or [])
    width = max((len(w) for w in workloads), default=0)
    lines = []
    for vid in sorted(i for i in ids if i is not None):
        lats = [r for r in records if r.get("type") == "latency" and r.get("vcpu") == vid]
        lats.sort(key=lambda r: _num(r.get("phase")) or 0)
        rest = []
        if lats:
            rest.append("; ".join(_latency(r, len(lats) > 1) for r in lats))
        elif workloads:
            rest.append("no latency measured")
        host = _host_part(vid, dev, hosts)
        if host is not None:
            rest.append(host)
        if not rest:
            continue
        head = f"vCPU {vid}" + (f"  {workloads[vid] if vid < len(workloads) else '':<{width}}" if workloads else "")
        lines.append(head + "  " + "  |  ".join(rest))
    return lines


def end_lines(records: list[dict], device_stats: dict) -> list[str]:
    """What to show once the VM has ended: the negotiation if no record told it live, then the vCPU lines."""
    out = []
    dev = (device_stats.get("pvsched") or {}).get("device")
    if dev is not None and not any(r.get("type") == "pvsched" for r in records):
        out.append(device_pvsched_line(dev))
    return out + vcpu_lines(records, device_stats)
