// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * pvsched guest driver of the test guest (CPL0, vCPU 0, once at boot):
 * PCI mechanism #1 enumeration of bus 0, BAR0 sizing and programming in
 * the 0xC0000000 window, then the negotiation of pyvmm/abi/pvsched_abi.h
 * through pyvmm/guest/common/pvsched_guest.h, the Linux module's own code.
 */
#include "kernel.h"
#include "pvsched_guest.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc
#define PCI_MMIO_START 0xc0000000u
#define PCI_MMIO_END 0xfec00000u
#define PCI_CMD_MEMORY 0x2
#define PCI_BAR_MEM_64 0x4
/* Room left after another device's assigned BAR when we must place ours. */
#define PCI_OTHER_BAR_ROOM 0x01000000u

static u32 pci_read(u32 bdf, u32 reg)
{
	outl(PCI_ADDR, 0x80000000u | bdf << 8 | (reg & 0xfc));
	return inl(PCI_DATA);
}

static void pci_write(u32 bdf, u32 reg, u32 v)
{
	outl(PCI_ADDR, 0x80000000u | bdf << 8 | (reg & 0xfc));
	outl(PCI_DATA, v);
}

/* Highest base of a memory BAR other devices already decode in the window. */
static void note_other_bars(u32 bdf, u32 *top)
{
	u32 reg;

	for (reg = 0x10; reg <= 0x24; reg += 4) {
		u32 bar = pci_read(bdf, reg);
		u32 base = bar & ~0xfu;

		if (bar & 1)
			continue;
		if (base >= PCI_MMIO_START && base < PCI_MMIO_END && base >= *top)
			*top = base + PCI_OTHER_BAR_ROOM;
		if (bar & PCI_BAR_MEM_64)
			reg += 4;
	}
}

/* Bus 0, function 0 of each slot (and the others of multi-function ones). */
static int pci_find(u32 *found_bdf, u32 *top)
{
	u32 dev, fn;
	int found = 0;

	for (dev = 0; dev < 32; dev++) {
		for (fn = 0; fn < 8; fn++) {
			u32 bdf = dev << 3 | fn;
			u32 id = pci_read(bdf, 0);

			if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
				if (fn == 0)
					break;
				continue;
			}
			if ((id & 0xffff) == PVSCHED_PCI_VENDOR_ID &&
			    id >> 16 == PVSCHED_PCI_DEVICE_ID && !found) {
				*found_bdf = bdf;
				found = 1;
			} else {
				note_other_bars(bdf, top);
			}
			if (fn == 0 && !(pci_read(bdf, 0x0c) & 0x00800000))
				break; /* not multi-function */
		}
	}
	return found;
}

/* Size BAR0; program it if firmware (nobody, here) left it unassigned. */
static u64 pci_setup_bar0(u32 bdf, u32 top)
{
	u32 orig = pci_read(bdf, 0x10), size, base;

	if (orig & 1)
		return 0; /* an I/O BAR: not pvsched */
	pci_write(bdf, 0x10, 0xffffffffu);
	size = ~(pci_read(bdf, 0x10) & ~0xfu) + 1;
	if (!size || size < PVSCHED_BAR0_SIZE)
		return 0;
	base = orig & ~0xfu;
	if (base < PCI_MMIO_START || base >= PCI_MMIO_END) {
		base = (top + size - 1) & ~(size - 1);
		if (base < PCI_MMIO_START || base + size > PCI_MMIO_END)
			return 0;
	}
	pci_write(bdf, 0x10, base);
	if (orig & PCI_BAR_MEM_64)
		pci_write(bdf, 0x14, 0);
	pci_write(bdf, 0x04, (pci_read(bdf, 0x04) & 0xffff) | PCI_CMD_MEMORY);
	return base;
}

void pvsched_probe(void *area, u32 area_size)
{
	struct pvsched_negotiation n;
	u32 bdf = 0, top = PCI_MMIO_START, size, i;
	u64 bar, *z = area;

	tg.pv_state = TG_PV_ABSENT;
	if (!pci_find(&bdf, &top))
		return;
	bar = pci_setup_bar0(bdf, top);
	if (!bar)
		return;
	size = pvsched_shm_bytes(tg.nr_vcpus);
	if (size > area_size)
		return;
	for (i = 0; i < size / 8; i++)
		z[i] = 0;
	pvsched_negotiate(bar, area, (u64)area, size,
			  tg.cfg.pvsched_version, tg.cfg.pvsched_features,
			  tg.cfg.force_features, &n);
	if (n.status == PVSCHED_GUEST_NO_DEVICE)
		return;
	/* The host may count other vCPUs than boot_info: a larger area then. */
	if (n.status == PVSCHED_STATUS_TOO_SMALL && n.nr_vcpus > tg.nr_vcpus &&
	    pvsched_shm_bytes(n.nr_vcpus) <= area_size) {
		size = pvsched_shm_bytes(n.nr_vcpus);
		pvsched_negotiate(bar, area, (u64)area, size,
				  tg.cfg.pvsched_version, tg.cfg.pvsched_features,
				  tg.cfg.force_features, &n);
	}
	tg.pv_status = n.status;
	tg.pv_version = n.version;
	tg.pv_features = n.features;
	tg.pv_host_version = n.host_version;
	tg.pv_host_features = n.host_features;
	tg.pv_host_nr_vcpus = n.nr_vcpus;
	tg.pv_shm_gpa = (u64)area;
	tg.pv_shm_size = size;
	tg.pv_bar = bar;
	if (n.status == PVSCHED_STATUS_ACTIVE) {
		tg.pv_shm = area;
		tg.pv_state = TG_PV_ACTIVE;
	} else {
		tg.pv_state = TG_PV_REFUSED;
	}
}
