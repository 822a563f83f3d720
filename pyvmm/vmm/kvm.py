"""The KVM API as Python sees it: ioctl numbers, ctypes structures, thin fd wrappers.

Numbers are derived with the `_IO/_IOR/_IOW/_IOWR` encoding of
<asm-generic/ioctl.h> from the structure sizes, never written as magic
numbers.  Every ioctl goes through libc's ioctl via ctypes: ctypes releases
the GIL during the call (so vCPU threads run in parallel) and does not retry
on EINTR (so a signal really kicks a vCPU out of KVM_RUN), and it passes
64-bit arguments that fcntl.ioctl refuses.
Reference: Documentation/virt/kvm/api.rst and include/uapi/linux/kvm.h.
"""

from __future__ import annotations

import ctypes
import mmap
import os

# --- ioctl encoding (asm-generic/ioctl.h) -------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(struct))


def _IOW(typ: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(struct))


def _IOWR(typ: int, nr: int, struct: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(struct))


u8, u16, u32, u64, s32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


# --- structures -----------------------------------------------------------------
class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                                   "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
                ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
                ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64), ("efer", u64),
                ("apic_base", u64), ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32), ("ecx", u32),
                ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(ctypes.Structure):
    """Header only; the entries follow (see cpuid2_type)."""

    _fields_ = [("nent", u32), ("padding", u32)]


def cpuid2_type(nent: int) -> type:
    """A kvm_cpuid2 with room for `nent` entries."""
    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * nent)]
    return _Cpuid2


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow (see msrs_type)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_type(n: int) -> type:
    """A kvm_msrs with room for `n` entries."""
    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]
    return _Msrs


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * 1024)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_msi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32),
                ("pad", u8 * 12)]


# kvm_run and its exit union
class _exit_hw(ctypes.Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _exit_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _exit_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _exit_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _exit_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _exit_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_union(ctypes.Union):
    _fields_ = [("hw", _exit_hw), ("fail_entry", _exit_fail_entry), ("ex", _exit_ex), ("io", _exit_io),
                ("mmio", _exit_mmio), ("internal", _exit_internal), ("system_event", _exit_system_event),
                ("padding", ctypes.c_char * 256)]


class kvm_run(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("u", _exit_union),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64)]


assert ctypes.sizeof(kvm_sregs) == 312 and ctypes.sizeof(kvm_regs) == 144
assert kvm_run.io.offset == 32 and ctypes.sizeof(_exit_union) == 256

# --- ioctl numbers ----------------------------------------------------------------
KVMIO = 0xAE
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_PIT2 = 33
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_PIT_SPEAKER_DUMMY = 1
KVM_MAX_CPUID_ENTRIES = 256

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
MP_STATE_NAMES = {KVM_MP_STATE_RUNNABLE: "runnable", KVM_MP_STATE_UNINITIALIZED: "not started",
                  KVM_MP_STATE_INIT_RECEIVED: "waiting for SIPI", KVM_MP_STATE_HALTED: "halted",
                  KVM_MP_STATE_SIPI_RECEIVED: "SIPI received"}

# exit reasons
EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR", 12: "TPR_ACCESS",
    16: "NMI", 17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 29: "X86_RDMSR", 30: "X86_WRMSR",
    33: "X86_BUS_LOCK", 37: "NOTIFY", 39: "MEMORY_FAULT",
}
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
INTERNAL_ERROR_NAMES = {1: "emulation failure", 2: "exception while delivering an exception",
                        3: "failure delivering an event", 4: "unexpected exit reason"}
SYSTEM_EVENT_NAMES = {1: "shutdown", 2: "reset", 3: "crash", 4: "wakeup", 5: "suspend", 6: "SEV termination"}
SYSTEM_EVENT_SHUTDOWN, SYSTEM_EVENT_RESET = 1, 2


KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1


def internal_error_detail(run: kvm_run) -> str:
    """", instruction f0 48 .." for an emulation failure that carries the bytes, else ", data 0x..", else ""."""
    ie = run.internal
    nd = min(ie.ndata, 16)
    if ie.suberror == KVM_INTERNAL_ERROR_EMULATION and nd >= 3 and \
            ie.data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        # struct kvm_run.emulation_failure: u64 flags, u8 insn_size, u8 insn_bytes[15]
        raw = b"".join(ie.data[i].to_bytes(8, "little") for i in (1, 2))
        size = min(raw[0], 15)
        return ", instruction " + " ".join(f"{b:02x}" for b in raw[1:1 + size])
    if nd:
        return ", data " + " ".join(f"{ie.data[i]:#x}" for i in range(nd))
    return ""


def exit_name(reason: int) -> str:
    """KVM_EXIT_* name of an exit reason, for messages."""
    return "KVM_EXIT_" + EXIT_NAMES.get(reason, str(reason))


# --- calling ioctl ---------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """A KVM ioctl failed; the message names the ioctl."""


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes._SimpleCData | int | None = None,
          name: str = "ioctl") -> int:
    """ioctl(fd, request, arg) through libc: structures by pointer, ints by value; raises KvmError."""
    if arg is None:
        p = None
    elif isinstance(arg, int):
        p = arg
    else:
        p = ctypes.addressof(arg)
    r = _libc.ioctl(fd, request, p)
    if r < 0:
        e = ctypes.get_errno()
        raise KvmError(e, f"{name}: {os.strerror(e)}")
    return r


def run_raw(fd: int) -> int:
    """KVM_RUN without raising: returns 0 or -errno (EINTR/EAGAIN when kicked). Releases the GIL."""
    if _libc.ioctl(fd, KVM_RUN, None) < 0:
        return -ctypes.get_errno()
    return 0


# --- fd wrappers ------------------------------------------------------------------
class Kvm:
    """An open /dev/kvm (or another path, to exercise error handling)."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(2, f"{path} does not exist: KVM is not available on this host") from None
        except PermissionError:
            raise KvmError(13, f"no permission to open {path} (need read/write access, e.g. the kvm group)") from None
        except OSError as e:
            raise KvmError(e.errno, f"cannot open {path}: {e.strerror}") from None
        try:
            version = ioctl(self.fd, KVM_GET_API_VERSION, name="KVM_GET_API_VERSION")
        except KvmError:
            os.close(self.fd)
            raise KvmError(25, f"{path} is not a KVM device (KVM_GET_API_VERSION failed)") from None
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(22, f"{path}: unsupported KVM API version {version}")
        self.path = path

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is missing, else its value."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """Size of each vCPU's kvm_run mapping."""
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, name="KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID, as a kvm_cpuid2 with its entries."""
        t = cpuid2_type(KVM_MAX_CPUID_ENTRIES)
        c = t(nent=KVM_MAX_CPUID_ENTRIES)
        ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, c, "KVM_GET_SUPPORTED_CPUID")
        return c

    def create_vm(self) -> int:
        """KVM_CREATE_VM: a new VM fd (default machine type)."""
        return ioctl(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")

    def close(self) -> None:
        """Close /dev/kvm."""
        os.close(self.fd)


class Vcpu:
    """A vCPU fd and its mapped kvm_run."""

    def __init__(self, vm_fd: int, index: int, mmap_size: int):
        self.index = index
        self.fd = ioctl(vm_fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self.run_map = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = kvm_run.from_buffer(self.run_map)
        self.run_base = ctypes.addressof(self.run)

    def get_regs(self) -> kvm_regs:
        r = kvm_regs()
        ioctl(self.fd, KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, r: kvm_regs) -> None:
        ioctl(self.fd, KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> kvm_sregs:
        s = kvm_sregs()
        ioctl(self.fd, KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: kvm_sregs) -> None:
        ioctl(self.fd, KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def set_cpuid2(self, c: ctypes.Structure) -> None:
        ioctl(self.fd, KVM_SET_CPUID2, c, "KVM_SET_CPUID2")

    def set_msrs(self, entries: list[tuple[int, int]]) -> None:
        t = msrs_type(len(entries))
        m = t(nmsrs=len(entries))
        for i, (index, data) in enumerate(entries):
            m.entries[i].index, m.entries[i].data = index, data
        n = ioctl(self.fd, KVM_SET_MSRS, m, "KVM_SET_MSRS")
        if n != len(entries):
            raise KvmError(22, f"KVM_SET_MSRS: MSR {entries[n][0]:#x} was refused")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """The MSRs of `indices` that KVM returned (it stops at the first it refuses)."""
        m = msrs_type(len(indices))(nmsrs=len(indices))
        for i, index in enumerate(indices):
            m.entries[i].index = index
        n = ioctl(self.fd, KVM_GET_MSRS, m, "KVM_GET_MSRS")
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def get_lapic(self) -> kvm_lapic_state:
        s = kvm_lapic_state()
        ioctl(self.fd, KVM_GET_LAPIC, s, "KVM_GET_LAPIC")
        return s

    def set_lapic(self, s: kvm_lapic_state) -> None:
        ioctl(self.fd, KVM_SET_LAPIC, s, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        s = kvm_mp_state()
        ioctl(self.fd, KVM_GET_MP_STATE, s, "KVM_GET_MP_STATE")
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self.fd, KVM_SET_MP_STATE, kvm_mp_state(state), "KVM_SET_MP_STATE")

    def tsc_khz(self) -> int:
        return ioctl(self.fd, KVM_GET_TSC_KHZ, name="KVM_GET_TSC_KHZ")

    def close(self) -> None:
        del self.run
        try:
            self.run_map.close()
        except BufferError:
            pass
        os.close(self.fd)
