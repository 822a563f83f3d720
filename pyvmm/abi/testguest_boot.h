/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Test-guest boot contract: how pyvmm's ELF loader (pyvmm/vmm/loader_elf.py)
 * starts the freestanding test guest (pyvmm/guest/testguest) and how that
 * guest talks back.  Only those two use it; the pvsched device contract is
 * pvsched_abi.h, and the Linux module needs neither this header nor its ports.
 *
 * Like pvsched_abi.h it needs only __u32/__u64, which each consumer provides
 * before including it (stdint in the test guest; Python reads the cffi cdef
 * of `cc -E -P -DTESTGUEST_BOOT_NO_ASSERTS`, made at build time by this
 * folder's Makefile, through pyvmm/abi/boot.py).
 */
#ifndef TESTGUEST_BOOT_H
#define TESTGUEST_BOOT_H

/*
 * Every vCPU enters the ELF's e_entry in 64-bit mode at CPL0 with RDI = vCPU
 * id and RSI = GPA of struct pvsched_boot_info.  The guest ends the VM by
 * writing its exit code (one byte) to port PVSCHED_TESTGUEST_EXIT_PORT, and
 * prints on the UART at PVSCHED_COM1_PORT.
 */
enum pvsched_boot {
	PVSCHED_BOOT_INFO_MAGIC = 0x544f4f42, /* "BOOT" */
	PVSCHED_TESTGUEST_EXIT_PORT = 0xf4,
	PVSCHED_COM1_PORT = 0x3f8,
};

struct pvsched_boot_info {
	__u32 magic;        /* PVSCHED_BOOT_INFO_MAGIC */
	__u32 nr_vcpus;
	__u64 mem_size;     /* bytes of guest RAM */
	__u64 tsc_khz;      /* from KVM_GET_TSC_KHZ */
	__u64 cmdline_gpa;  /* NUL-terminated guest command line */
	__u64 cmdline_len;  /* bytes, without the NUL */
	__u64 reserved[3];
};

#ifndef TESTGUEST_BOOT_NO_ASSERTS
_Static_assert(sizeof(struct pvsched_boot_info) == 64, "boot_info");
#endif

#endif /* TESTGUEST_BOOT_H */
