/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * What the kernel half (CPL0, emulated under PVM: keep it small) and the user
 * half (CPL3, native: the workloads and all the arithmetic) of the test
 * guest share: the system-call numbers and the global state vCPU 0 sets up.
 */
#ifndef TG_GUEST_H
#define TG_GUEST_H

#include "config.h"

/* System calls: `int3` (see entry.S), number in rax, arguments in rdi, rsi, rdx. */
enum tg_syscall {
	SYS_WRITE = 1,       /* (buf, len): bytes to COM1 */
	SYS_SET_TASK = 2,    /* (policy, rt_priority, nice): publish the running task */
	SYS_SLEEP_UNTIL = 3, /* (tsc, ipi): slot IDLE, halt until the timer at tsc
			      * (or, with ipi, a wake IPI: pending ones return at once) */
	SYS_EXIT = 4,        /* (code): end the VM through the exit port */
	SYS_HALT = 5,        /* (): slot IDLE, halt for good */
	SYS_WAKE = 6,        /* (vcpu): set its wake_hint, send it the wake IPI */
	SYS_TICK = 7,        /* (period_tsc): a timer tick every period while the task runs; 0 stops it */
};

enum tg_exit_code {
	TG_EXIT_OK = 0,
	TG_EXIT_BAD_CMDLINE = 2,
	TG_EXIT_EXCEPTION = 3,
	TG_EXIT_BAD_BOOT = 4,
	TG_EXIT_VCPU_LOST = 5,
	TG_EXIT_NO_MEMORY = 6,
};

enum tg_pvsched_state {
	TG_PV_DISABLED = 0, /* pvsched=0 */
	TG_PV_ABSENT = 1,
	TG_PV_REFUSED = 2,
	TG_PV_ACTIVE = 3,
};

/* Set by vCPU 0 before it releases the others (boot_go); read-only after. */
struct tg_global {
	struct tg_config cfg;
	u64 tsc_khz;
	u64 mem_size;
	u32 nr_vcpus;
	u32 timer_tsc_deadline;   /* 1: IA32_TSC_DEADLINE, 0: LAPIC one-shot */
	u32 pv_state;             /* enum tg_pvsched_state */
	s32 pv_status;            /* STATUS after ENABLE */
	u32 pv_version;
	u32 pv_features;
	u64 pv_shm_gpa;
	u32 pv_shm_size;
	u32 pv_host_nr_vcpus;
	u32 pv_host_version;
	u32 pv_host_features;
	u64 pv_bar;
	void *pv_shm;             /* the shared area when active */
	u64 heap_start;           /* free RAM after the image, for sample arrays */
	u64 heap_end;
	u64 start_tsc;            /* common start of every vCPU's first phase */
	char cmdline_warning[160];  /* set when a key was ignored */
	volatile u32 boot_go;
	volatile u32 nr_online __attribute__((aligned(CACHELINE)));
	volatile u32 console_lock __attribute__((aligned(CACHELINE)));
	volatile u32 failed __attribute__((aligned(CACHELINE)));
};

extern struct tg_global tg;

/* Written by the kernel's timer interrupt, read by the probe: one line per vCPU. */
struct tg_irq_stamp {
	volatile u64 tsc; /* TSC at the timer interrupt's entry */
} __attribute__((aligned(CACHELINE)));

extern struct tg_irq_stamp tg_irq[TG_MAX_VCPUS];

/* A waker's message to the wakee of a vCPU: the deadline it served, under a count. */
struct tg_wake_msg {
	volatile u64 seq;
	volatile u64 deadline;
} __attribute__((aligned(CACHELINE)));

extern struct tg_wake_msg tg_wake[TG_MAX_VCPUS];

/*
 * Per vCPU, what the kernel shares with the lock workload: the slot its own
 * writes go to (the shared one, or a dummy without pvsched), which the CPL3
 * lock code marks too (critsec.h), and what its interrupts found there.
 */
struct tg_cpu_share {
	struct pvsched_guest_area *slot; /* set before the user half starts */
	volatile u64 irqs;    /* interrupts that came while a task ran (not ending a sleep) */
	volatile u64 irqs_cs; /* those that found PREEMPT_DISABLED set: inside a lock hold */
	volatile u64 nested;  /* those that came in the middle of a CPL3 slot write */
	volatile u64 shadow_wakes; /* wake-ups delivered between sti and hlt (entry.S, sleep_fast) */
	volatile u64 sti_wakes;    /* wake-ups delivered at the sti of a sti;hlt pair (entry.S) */
} __attribute__((aligned(CACHELINE)));

extern struct tg_cpu_share tg_cpu[TG_MAX_VCPUS];

/* Take/release the console lock (any CPL: all pages are user-accessible). */
static inline void console_lock(void)
{
	while (__atomic_exchange_n(&tg.console_lock, 1, __ATOMIC_ACQUIRE))
		__asm__ __volatile__("pause" ::: "memory");
}

static inline int console_trylock(u32 spins)
{
	while (__atomic_exchange_n(&tg.console_lock, 1, __ATOMIC_ACQUIRE)) {
		if (!spins--)
			return 0;
		__asm__ __volatile__("pause" ::: "memory");
	}
	return 1;
}

static inline void console_unlock(void)
{
	__atomic_store_n(&tg.console_lock, 0, __ATOMIC_RELEASE);
}

/* User half entry: runs the workloads of this vCPU at CPL3. */
void user_main(u32 vcpu) __attribute__((noreturn));

#endif
