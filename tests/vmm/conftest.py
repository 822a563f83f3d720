"""Tiny guests for VMM tests: GNU as sources built into ELFs that load by the test-guest boot contract."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

# Included at the top of every tiny guest. EXIT: write a byte to the debug-exit port, then halt for good.
PRELUDE = r"""
.code64
.macro EXIT code
    mov $\code, %al
    mov $0xf4, %dx
    out %al, %dx
99: cli
    hlt
    jmp 99b
.endm
.globl _start
"""


def build_guest(tmp_path: Path, source: str, name: str = "guest") -> Path:
    """Assemble and link `source` (AT&T syntax, entry _start) into a static ELF at 1 MiB."""
    src = tmp_path / f"{name}.S"
    elf = tmp_path / f"{name}.elf"
    src.write_text(PRELUDE + source)
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-N", "-Wl,-Ttext=0x100000",
                    "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-o", str(elf), str(src)],
                   check=True, capture_output=True, text=True)
    return elf


@pytest.fixture
def guest(tmp_path):
    """guest(source, name="guest") -> Path of the built ELF."""
    return lambda source, name="guest": build_guest(tmp_path, source, name)
