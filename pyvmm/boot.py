"""Library API: boot a guest and collect what it printed.  The CLI, tests and the benchmark use run_vm().

`run_vm(BootConfig(...))` builds the Machine, loads the kernel (an ELF test
guest by the boot contract, or a Linux bzImage: told apart by magic), adds
the pvsched device unless told not to, runs the VM to its end and returns
BootResult(exit_code, console, records, message).  Configuration problems
raise VmmError (one line for the user); what happens once the guest runs,
including crashes and the timeout, is reported in the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pyvmm.common.artifacts import BuildError, ensure_built
from pyvmm.device.device import PvschedDevice
from pyvmm.vmm.console import Console, ConsoleInput, parse_records
from pyvmm.vmm.loader_elf import ImageError, setup_testguest
from pyvmm.vmm.loader_linux import setup_linux
from pyvmm.vmm.machine import EXIT_TIMEOUT, Machine, VmmError

BZIMAGE_MAGIC_OFFSET, BZIMAGE_MAGIC = 0x202, b"HdrS"


@dataclass
class BootConfig:
    """Everything `pyvmm boot` takes; the defaults are the documented ones."""

    kernel: str | os.PathLike | None = None   # None: the bundled test guest
    initrd: str | os.PathLike | None = None
    cmdline: str = ""
    cpus: int = 2
    mem_mib: int = 256
    timeout: float | None = None
    pvsched: bool = True
    policy: bool = True
    tunables: dict[str, str] = field(default_factory=dict)
    program: str = "pvsched"                  # the BPF policy (pyvmm.policy.programs)
    host_version: int | None = None
    host_features: int | None = None
    kvm_device: str = "/dev/kvm"
    console_stream: BinaryIO | None = None    # where console output goes live (None: only collected)
    console_input: int | None = None          # fd whose bytes go to the guest's UART (the CLI: stdin)
    control_socket: bool = True
    setup: list[Callable[[Machine], None]] = field(default_factory=list)  # extra devices, for tests


@dataclass
class BootResult:
    """How the VM ended and what the guest printed."""

    exit_code: int
    console: str
    records: list[dict]
    message: str | None = None   # one line when the VM did not end by the guest's own exit code
    elapsed_s: float = 0.0
    device_stats: dict = field(default_factory=dict)  # label -> what a device kept at stop (final_stats)

    @property
    def timed_out(self) -> bool:
        return self.exit_code == EXIT_TIMEOUT


def kernel_kind(data: bytes) -> str:
    """'elf' or 'bzimage' by magic; VmmError for anything else."""
    if data[:4] == b"\x7fELF":
        return "elf"
    if len(data) > 0x206 and data[BZIMAGE_MAGIC_OFFSET:BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC:
        return "bzimage"
    raise VmmError("not an ELF file nor a Linux bzImage")


def _read_file(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise VmmError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise VmmError(f"{what} {path}: is a directory") from None
    except OSError as e:
        raise VmmError(f"{what} {path}: {e.strerror}") from None


def default_kernel() -> Path:
    """The bundled test guest (built at setup)."""
    try:
        return ensure_built("testguest")
    except (BuildError, OSError) as e:
        raise VmmError(f"the bundled test guest: {e}") from None


def _pvsched_device(cfg: BootConfig) -> PvschedDevice:
    return PvschedDevice(policy=cfg.policy, tunables=dict(cfg.tunables) or None,
                         host_version=cfg.host_version, host_features=cfg.host_features, program=cfg.program)


def build_machine(cfg: BootConfig, console: Console) -> Machine:
    """Machine with the kernel loaded and devices added, ready to run (raises VmmError)."""
    kpath = cfg.kernel if cfg.kernel is not None else default_kernel()
    data = _read_file(kpath, "kernel")
    try:
        kind = kernel_kind(data)
    except VmmError as e:
        raise VmmError(f"kernel {kpath}: {e}") from None
    initrd = _read_file(cfg.initrd, "initrd") if cfg.initrd is not None else None
    if initrd is not None and kind != "bzimage":
        raise VmmError("--initrd is only for Linux (bzImage) kernels")
    m = Machine(cfg.cpus, cfg.mem_mib, cfg.kvm_device, console)
    try:
        try:
            if kind == "elf":
                setup_testguest(m, data, cfg.cmdline, str(kpath))
            else:
                setup_linux(m, data, cfg.cmdline, initrd, str(kpath))
        except (ImageError, ValueError) as e:
            raise VmmError(str(e)) from None
        if cfg.pvsched:
            m.add_pci_device(_pvsched_device(cfg))
        for hook in cfg.setup:
            hook(m)
    except BaseException:
        m.close()
        raise
    return m


def run_vm(cfg: BootConfig) -> BootResult:
    """Boot per cfg and run to the end; raises VmmError for bad configuration."""
    if cfg.timeout is not None and cfg.timeout <= 0:
        raise VmmError(f"--timeout must be positive (got {cfg.timeout:g})")
    console = Console(cfg.console_stream)
    t0 = time.monotonic()
    m = build_machine(cfg, console)
    try:
        if cfg.console_input is not None and ConsoleInput.usable(cfg.console_input):
            with ConsoleInput(cfg.console_input, m.uart.feed):
                code = m.run(cfg.timeout, cfg.control_socket)
        else:
            code = m.run(cfg.timeout, cfg.control_socket)
    finally:
        m.close()
    text = console.text()
    stats = {d.label: d.final_stats for d in m.devices if d.final_stats is not None}
    return BootResult(code, text, parse_records(text), m.exit_message, time.monotonic() - t0, stats)
