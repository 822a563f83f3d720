/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The lock workload's critical sections: a spinlock that vCPUs contend at
 * CPL3, the PREEMPT_DISABLED mark its holder writes into its own slot, and
 * the kernel's interrupt-time slot writes that must not lose or tear it.
 * Pure (static inline, no guest state): the unit tests build it for the host
 * too, with threads as vCPUs and signals as interrupts.
 *
 * The rule that keeps the slot right while a CPL3 task and the kernel's
 * interrupts both write it (an interrupt lands between any two instructions
 * of the task):
 *  - The task's mark is three instructions: `incl seq`, one store of the
 *    whole flag word, `incl seq`.  An increment of memory is one instruction,
 *    so an interrupt sees seq either before or after it, and only the owner
 *    vCPU writes seq.  The task stores PREEMPT_DISABLED or 0: while a task runs
 *    at CPL3 no other flag is set, because the kernel clears its own
 *    (IN_HARDIRQ, IDLE) before it returns to CPL3.
 *  - A kernel write that finds seq odd interrupted such a mark.  It then writes
 *    inside that open section and leaves seq alone (tg_kslot_begin/_end): the
 *    task's closing increment ends both, and readers see an odd seq, and retry,
 *    for that long.  Incrementing seq itself would make it even in the middle
 *    of the task's section, and the task's close would leave it odd.
 *  - The kernel's interrupt writes keep PREEMPT_DISABLED as they found it: the
 *    bit belongs to the task, which clears it itself before it releases.
 *  - The kernel's other slot writes (system calls, the interrupt that ends a
 *    halt) run where the task cannot be inside a mark, and a task never sleeps
 *    holding the lock: they keep pvsched_guest.h's plain helpers.
 * Cost: a mark is three native stores at CPL3, less than any kernel slot write
 * (a section of six or more CPL0 instructions, emulated under PVM).  A mark
 * leaves guest_ns alone (tracing only).
 */
#ifndef TG_CRITSEC_H
#define TG_CRITSEC_H

#include "arch.h"

/*
 * Test-and-test-and-set, as Linux falls back to in a guest without PV
 * spinlocks (virt_spin_lock): a FIFO ticket lock would hand the lock to a
 * waiter the host has preempted.  `owner` and `gen` exist to check the lock
 * (mutual exclusion, and that the mark is set exactly while it is held).
 */
struct tg_spinlock {
	volatile u32 locked;
	volatile u32 owner; /* id + 1 of the holder, 0 when free */
	/*
	 * +1 at acquisition (after owner is set) and +1 at release (before it is
	 * cleared): odd while held.  An observer that reads the same gen before
	 * and after a look at the slots saw no hold begin or end meanwhile.
	 */
	volatile u64 gen;
} __attribute__((aligned(CACHELINE)));

struct tg_lock_stats {
	u64 acquisitions;
	u64 violations; /* the lock was found owned by another at acquisition, or lost during the hold */
	u64 flag_lost;  /* PREEMPT_DISABLED gone from the slot before the holder cleared it */
};

static inline void tg_lock_acquire(struct tg_spinlock *l)
{
	while (READ_ONCE(l->locked) || __atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
}

static inline void tg_lock_release(struct tg_spinlock *l)
{
	__atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

/* The task's own slot write (the rule above): flags is PREEMPT_DISABLED or 0. */
static inline void tg_slot_mark(struct pvsched_guest_area *g, u32 flags)
{
	__asm__ __volatile__("incl %0\n\t"
			     "movl %2, %1\n\t"
			     "incl %0"
			     : "+m"(g->seq), "=m"(g->flags)
			     : "r"(flags)
			     : "memory", "cc");
}

/* Open a kernel write at interrupt time; 1 when it nests in the task's open mark (seq odd). */
static inline u32 tg_kslot_begin(struct pvsched_guest_area *g)
{
	u32 s = READ_ONCE(g->seq);

	if (s & 1)
		return 1;
	WRITE_ONCE(g->seq, s + 1);
	barrier();
	return 0;
}

static inline void tg_kslot_end(struct pvsched_guest_area *g, u32 nested, u64 now_ns)
{
	WRITE_ONCE(g->guest_ns, now_ns);
	barrier();
	if (!nested)
		WRITE_ONCE(g->seq, READ_ONCE(g->seq) + 1);
}

/* An interrupt's entry on the owner vCPU: IN_HARDIRQ on, PREEMPT_DISABLED kept; returns that bit. */
static inline u32 tg_kslot_irq_enter(struct pvsched_guest_area *g, u64 now_ns, u32 *nested)
{
	u32 n = tg_kslot_begin(g);
	u32 keep = READ_ONCE(g->flags) & PVSCHED_FLAG_PREEMPT_DISABLED;

	WRITE_ONCE(g->flags, keep | PVSCHED_FLAG_IN_HARDIRQ);
	tg_kslot_end(g, n, now_ns);
	*nested = n;
	return keep;
}

/* Its exit: the interrupted task's parameters again, with the bit `keep` the entry returned. */
static inline void tg_kslot_irq_exit(struct pvsched_guest_area *g, u32 keep, s32 policy,
				     u32 rt_priority, s32 nice, u64 now_ns)
{
	u32 n = tg_kslot_begin(g);

	WRITE_ONCE(g->flags, keep);
	WRITE_ONCE(g->policy, policy);
	WRITE_ONCE(g->rt_priority, rt_priority);
	WRITE_ONCE(g->nice, nice);
	tg_kslot_end(g, n, now_ns);
}

/*
 * One acquisition by `me` (nonzero), held `hold` TSC cycles with the slot
 * marked from just after acquiring until just before releasing; returns the
 * wait, first attempt to acquisition, in TSC cycles.
 */
static inline u64 tg_lock_cycle(struct tg_spinlock *l, struct pvsched_guest_area *g, u32 me,
				u64 hold, struct tg_lock_stats *st)
{
	u64 t0 = rdtsc(), t1;

	tg_lock_acquire(l);
	t1 = rdtsc();
	if (l->owner)
		st->violations++;
	l->owner = me;
	l->gen = l->gen + 1;
	tg_slot_mark(g, PVSCHED_FLAG_PREEMPT_DISABLED);
	while (rdtsc() - t1 < hold)
		barrier();
	if (!(READ_ONCE(g->flags) & PVSCHED_FLAG_PREEMPT_DISABLED))
		st->flag_lost++;
	tg_slot_mark(g, 0);
	l->gen = l->gen + 1;
	if (l->owner != me)
		st->violations++;
	l->owner = 0;
	tg_lock_release(l);
	st->acquisitions++;
	return t1 - t0;
}

#endif
