"""The KVM layer's derived ioctl numbers and structure layouts match the kernel's uapi (pure logic)."""

import ctypes

from pyvmm.vmm import kvm


def test_ioctl_numbers_match_linux_uapi():
    # Values as the kernel headers expand them (x86-64).
    assert kvm.KVM_RUN == 0xAE80
    assert kvm.KVM_CREATE_VM == 0xAE01
    assert kvm.KVM_GET_REGS == 0x8090AE81
    assert kvm.KVM_SET_SREGS == 0x4138AE84
    assert kvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvm.KVM_IRQ_LINE == 0x4008AE61
    assert kvm.KVM_CREATE_PIT2 == 0x4040AE77
    assert kvm.KVM_SET_CPUID2 == 0x4008AE90
    assert kvm.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert kvm.KVM_SET_LAPIC == 0x4400AE8F
    assert kvm.KVM_SET_MP_STATE == 0x4004AE99


def test_kvm_run_layout():
    assert kvm.kvm_run.exit_reason.offset == 8
    assert kvm.kvm_run.io.offset == 32
    assert kvm.kvm_run.kvm_valid_regs.offset == 32 + 256
    assert ctypes.sizeof(kvm.kvm_sregs) == 312
    assert ctypes.sizeof(kvm.kvm_cpuid_entry2) == 40
