"""Run inside the lab: where each named tracepoint's static call jumps, one line "TP -> SYMBOL" each.

A tracepoint's static call trampoline (__SCT__tp_func_TP) is a 5-byte `jmp rel32`: to its one probe, or
to __traceiter_TP once it has two probes or more.  The bytes are read from /proc/kcore and the target
named from /proc/kallsyms.  Exit 1 with one line when either cannot be read.
"""

from __future__ import annotations

import struct
import sys
from typing import BinaryIO

from elftools.elf.elffile import ELFFile

JMP_REL32 = 0xE9


def kallsyms() -> dict[str, int]:
    """Symbol -> address (the first of a name)."""
    out: dict[str, int] = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, _, name = line.split()[:3]
            out.setdefault(name, int(addr, 16))
    return out


def read_kernel(kcore: BinaryIO, segments: list, addr: int, n: int) -> bytes:
    """n bytes of kernel memory at addr, through /proc/kcore's load segments."""
    for seg in segments:
        if seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_memsz"]:
            kcore.seek(seg["p_offset"] + addr - seg["p_vaddr"])
            return kcore.read(n)
    raise OSError(f"{addr:#x} is in no segment of /proc/kcore")


def target(tp: str, syms: dict[str, int], names: dict[int, str], kcore: BinaryIO, segments: list) -> str:
    """The symbol tracepoint tp's static call jumps to, or what its trampoline holds instead."""
    tramp = syms[f"__SCT__tp_func_{tp}"]
    code = read_kernel(kcore, segments, tramp, 5)
    if code[0] != JMP_REL32:
        return f"not a jmp: {code.hex()}"
    dst = tramp + 5 + struct.unpack("<i", code[1:5])[0]
    return names.get(dst, f"{dst:#x}")


def main(tps: list[str]) -> int:
    """Print each tracepoint's static call target."""
    try:
        syms = kallsyms()
        names = {a: n for n, a in syms.items()}
        with open("/proc/kcore", "rb") as kcore:  # its headers read once, for every tracepoint
            segments = [seg for seg in ELFFile(kcore).iter_segments() if seg["p_type"] == "PT_LOAD"]
            for tp in tps:
                print(f"{tp} -> {target(tp, syms, names, kcore, segments)}")
    except (OSError, KeyError) as e:
        print(f"static_calls: cannot read the kernel's static calls: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
