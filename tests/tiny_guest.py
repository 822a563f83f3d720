"""Tiny guests for tests: GNU as sources built into ELFs that load by the test-guest boot contract.

Every source gets PRELUDE first: EXIT, and PCI configuration mechanism #1 (CFG_ADDR/CFG_R/CFG_W on the
function whose address is in %r12d, PCI_FIND to put a device's address there).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PRELUDE = r"""
.code64
# EXIT code: write a byte to the debug-exit port, then halt for good.
.macro EXIT code
    mov $\code, %al
    mov $0xf4, %dx
    out %al, %dx
99: cli
    hlt
    jmp 99b
.endm
# Config mechanism #1 for the function at %r12d (0x80000000 | slot << 11): CFG_ADDR selects a register and
# leaves %dx at the data port, CFG_R reads it into %eax, CFG_W writes a constant.
.macro CFG_ADDR reg
    mov %r12d, %eax
    or $\reg, %eax
    mov $0xcf8, %dx
    out %eax, %dx
    mov $0xcfc, %dx
.endm
.macro CFG_R reg
    CFG_ADDR \reg
    in %dx, %eax
.endm
.macro CFG_W reg, value
    CFG_ADDR \reg
    mov $\value, %eax
    out %eax, %dx
.endm
# PCI_FIND id: the first slot on bus 0 whose config dword 0 is `id` (device << 16 | vendor), its address
# left in %r12d (clobbers %eax, %ebx, %dx); EXIT 2 when no slot has it.
.macro PCI_FIND id
    xor %ebx, %ebx
.Lpci_scan\@:
    mov %ebx, %r12d
    shl $11, %r12d
    or $0x80000000, %r12d
    CFG_R 0
    cmp $\id, %eax
    je .Lpci_found\@
    inc %ebx
    cmp $32, %ebx
    jne .Lpci_scan\@
    EXIT 2
.Lpci_found\@:
.endm
.globl _start
"""


def build_guest(tmp_path: Path, source: str, name: str = "guest") -> Path:
    """Assemble and link PRELUDE + `source` (AT&T syntax, entry _start) into a static ELF at 1 MiB."""
    src = tmp_path / f"{name}.S"
    elf = tmp_path / f"{name}.elf"
    src.write_text(PRELUDE + source)
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-N", "-Wl,-Ttext=0x100000",
                    "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-o", str(elf), str(src)],
                   check=True, capture_output=True, text=True)
    return elf
