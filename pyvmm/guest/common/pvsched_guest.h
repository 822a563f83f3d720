/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Guest half of pvsched, shared by the test guest and the Linux module so
 * that the path exercised under pyvmm is the module's own: BAR0
 * negotiation and the seqcount slot writes, as static inline helpers.
 *
 * The includer provides, before including this file:
 *   __u8/__u16/__u32/__u64/__s32 types and pvsched_abi.h,
 *   pvsched_bar_t   a type for the mapped BAR0 (Linux: void __iomem *),
 *                   handed to the accessors below unchanged, so that
 *                   its address space (e.g. __iomem) is never cast away
 *   u32 PVSCHED_BAR_READ32(pvsched_bar_t bar, u32 off)
 *   void PVSCHED_BAR_WRITE32(pvsched_bar_t bar, u32 off, u32 val)
 *   pvsched_wmb()   store-store barrier (x86: a compiler barrier suffices)
 *   PVSCHED_WRITE_ONCE(x, v) / PVSCHED_READ_ONCE(x)
 *
 * Slot writes must not be interrupted by another write to the same slot on
 * the owner vCPU: call them with interrupts off (or from the only context
 * that writes), or a nested write would leave the seqcount even mid-write.
 */
#ifndef PVSCHED_GUEST_H
#define PVSCHED_GUEST_H

/* Result of pvsched_negotiate(): what was agreed and what the host said. */
struct pvsched_negotiation {
	__u32 host_version;
	__u32 host_features;
	__u32 version;   /* what the guest asked for */
	__u32 features;  /* what the guest asked for */
	__u32 nr_vcpus;  /* as the host reports it */
	__s32 status;    /* STATUS after ENABLE, or a negative code below */
};

/* Returned in .status when the device is not pvsched at all. */
enum { PVSCHED_GUEST_NO_DEVICE = -100 };

/* Bytes a shared area needs for nr_vcpus slots, rounded to whole pages. */
static inline __u32 pvsched_shm_bytes(__u32 nr_vcpus)
{
	__u32 b = PVSCHED_SLOT_OFFSET + PVSCHED_SLOT_SIZE * nr_vcpus;

	return (b + PVSCHED_PAGE_SIZE - 1) & ~(__u32)(PVSCHED_PAGE_SIZE - 1);
}

/* Slot of vCPU n inside the shared area starting at shm. */
static inline struct pvsched_slot *pvsched_slot(void *shm, __u32 n)
{
	return (struct pvsched_slot *)((char *)shm + PVSCHED_SLOT_OFFSET +
				       (unsigned long)n * PVSCHED_SLOT_SIZE);
}

/*
 * Fill the header of a zeroed shared area.  pvsched_negotiate() does this
 * before ENABLE; a guest without the device (the Linux module's self-test)
 * calls it directly so its area has the same layout.
 */
static inline void pvsched_init_header(void *shm, __u32 version,
				       __u32 features, __u32 nr_vcpus)
{
	struct pvsched_shm_header *h = (struct pvsched_shm_header *)shm;

	h->magic = PVSCHED_MAGIC;
	h->version = version;
	h->features = features;
	h->nr_vcpus = nr_vcpus;
	h->slot_size = PVSCHED_SLOT_SIZE;
	h->slot_offset = PVSCHED_SLOT_OFFSET;
	pvsched_wmb();
}

/*
 * Negotiate and enable: check MAGIC, pick version and features, fill the
 * header of the zeroed area at shm (guest virtual) / shm_gpa (physical),
 * hand over GPA and size, ENABLE, and report STATUS.  version/features are
 * what the guest speaks/wants; features are masked with what the host
 * offers unless force_features is set (used to test refusals).
 */
static inline void pvsched_negotiate(pvsched_bar_t bar, void *shm,
				     __u64 shm_gpa, __u32 shm_size,
				     __u32 version, __u32 features,
				     int force_features,
				     struct pvsched_negotiation *n)
{
	n->host_version = 0;
	n->host_features = 0;
	n->nr_vcpus = 0;
	n->version = version;
	n->features = features;
	if (PVSCHED_BAR_READ32(bar, PVSCHED_REG_MAGIC) != PVSCHED_MAGIC) {
		n->status = PVSCHED_GUEST_NO_DEVICE;
		return;
	}
	n->host_version = PVSCHED_BAR_READ32(bar, PVSCHED_REG_HOST_VERSION);
	n->host_features = PVSCHED_BAR_READ32(bar, PVSCHED_REG_HOST_FEATURES);
	n->nr_vcpus = PVSCHED_BAR_READ32(bar, PVSCHED_REG_NR_VCPUS);
	if (!force_features)
		n->features = features & n->host_features;

	pvsched_init_header(shm, n->version, n->features, n->nr_vcpus);

	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_GUEST_VERSION, n->version);
	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_GUEST_FEATURES, n->features);
	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_SHM_GPA_LO, (__u32)shm_gpa);
	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_SHM_GPA_HI, (__u32)(shm_gpa >> 32));
	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_SHM_SIZE, shm_size);
	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_CONTROL, PVSCHED_CTRL_ENABLE);
	n->status = (__s32)PVSCHED_BAR_READ32(bar, PVSCHED_REG_STATUS);
}

/* Stop sharing: the host forgets the area (the guest may then free it). */
static inline void pvsched_disable(pvsched_bar_t bar)
{
	PVSCHED_BAR_WRITE32(bar, PVSCHED_REG_CONTROL, PVSCHED_CTRL_DISABLE);
}

/* Open a seqcount write section on the owner's guest area. */
static inline void pvsched_write_begin(struct pvsched_guest_area *g)
{
	PVSCHED_WRITE_ONCE(g->seq, PVSCHED_READ_ONCE(g->seq) + 1);
	pvsched_wmb();
}

/* Close it: readers that saw the odd value or a different seq retry. */
static inline void pvsched_write_end(struct pvsched_guest_area *g, __u64 now_ns)
{
	PVSCHED_WRITE_ONCE(g->guest_ns, now_ns);
	pvsched_wmb();
	PVSCHED_WRITE_ONCE(g->seq, PVSCHED_READ_ONCE(g->seq) + 1);
}

/* Publish the task now running on this vCPU and the full flag word. */
static inline void pvsched_set_task(struct pvsched_guest_area *g, __u32 flags,
				    __s32 policy, __u32 rt_priority,
				    __s32 nice, __u64 now_ns)
{
	pvsched_write_begin(g);
	PVSCHED_WRITE_ONCE(g->flags, flags);
	PVSCHED_WRITE_ONCE(g->policy, policy);
	PVSCHED_WRITE_ONCE(g->rt_priority, rt_priority);
	PVSCHED_WRITE_ONCE(g->nice, nice);
	pvsched_write_end(g, now_ns);
}

/* Set and clear flag bits (irq/softirq/nmi/preempt/idle) on the owner slot. */
static inline void pvsched_update_flags(struct pvsched_guest_area *g,
					__u32 set, __u32 clear, __u64 now_ns)
{
	pvsched_write_begin(g);
	PVSCHED_WRITE_ONCE(g->flags, (PVSCHED_READ_ONCE(g->flags) & ~clear) | set);
	pvsched_write_end(g, now_ns);
}

/*
 * Any vCPU that wakes an RT task onto vCPU `target` sets the hint (a plain
 * aligned 32-bit store is atomic on x86); the owner clears it once the task
 * runs.
 */
static inline void pvsched_set_wake_hint(struct pvsched_guest_area *g)
{
	PVSCHED_WRITE_ONCE(g->wake_hint, 1);
}

static inline void pvsched_clear_wake_hint(struct pvsched_guest_area *g)
{
	if (PVSCHED_READ_ONCE(g->wake_hint))
		PVSCHED_WRITE_ONCE(g->wake_hint, 0);
}

#endif /* PVSCHED_GUEST_H */
