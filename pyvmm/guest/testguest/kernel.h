/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/* Kernel-half internals shared between kernel.c and pvsched_drv.c. */
#ifndef TG_KERNEL_H
#define TG_KERNEL_H

#include "arch.h"
#include "critsec.h"
#include "guest.h"

/* What pyvmm/guest/common/pvsched_guest.h needs from its includer. */
/* BAR0 is identity-mapped here: its address is the physical one. */
typedef u64 pvsched_bar_t;
#define PVSCHED_BAR_READ32(bar, off) mmio_read32((bar) + (off))
#define PVSCHED_BAR_WRITE32(bar, off, v) mmio_write32((bar) + (off), (v))
#define pvsched_wmb() barrier()
#define PVSCHED_WRITE_ONCE(x, v) WRITE_ONCE(x, v)
#define PVSCHED_READ_ONCE(x) READ_ONCE(x)

void kputs(const char *s);
void kexit(u32 code) __attribute__((noreturn));
void kfail(u32 code, const char *msg) __attribute__((noreturn));

/*
 * Find the pvsched PCI device, map BAR0, negotiate and enable the shared
 * area `area` (zeroed here); results land in tg.pv_*.
 */
void pvsched_probe(void *area, u32 area_size);

#endif
