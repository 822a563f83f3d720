/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The test guest's command line (its keys: pyvmm/guest/testguest/README.md,
 * "Command line"), parsed once by vCPU 0 and read by every vCPU afterwards.
 * Pure code: also compiled for the host by the unit tests.
 */
#ifndef TG_CONFIG_H
#define TG_CONFIG_H

#include "types.h"

#define TG_MAX_VCPUS 32
#define TG_MAX_PHASES 8

/*
 * The pvsched features this guest implements, and so asks for by default:
 * a feature added to the ABI header joins this mask in the change that
 * implements it here, never before (the host acts on what a guest claims).
 */
#define TG_PVSCHED_FEATURES                                                     \
	(PVSCHED_F_CRITICAL_SECTIONS | PVSCHED_F_TASK_PARAMS | PVSCHED_F_HOST_FEEDBACK | \
	 PVSCHED_F_WAKE_HINT | PVSCHED_F_RT_WAITER)

enum tg_workload {
	TG_WL_PROBE = 0, /* cyclictest-like RT task woken every interval */
	TG_WL_BUSY = 1,  /* CPL3 spinner at SCHED_OTHER nice 0 */
	TG_WL_HOG = 2,   /* asks FIFO hog_prio and never yields */
	TG_WL_IDLE = 3,  /* halts */
	TG_WL_WAKER = 4, /* a probe that also wakes the wakee tasks of other vCPUs */
	TG_WL_WAKEE = 5, /* RT task woken from another vCPU (IPI + wake_hint) */
	TG_WL_TICK = 6,  /* SCHED_OTHER task woken every interval, works tick_us, sleeps again */
	TG_WL_LOCK = 7,  /* contends one spinlock with the other lock vCPUs (lock_hold_us, lock_gap_us) */
};

struct tg_config {
	u32 duration_ms;      /* duration=<s>, decimals allowed (1.5) */
	u32 interval_us;      /* interval=<us> */
	s32 probe_policy;     /* PVSCHED_POLICY_RR or _FIFO */
	u32 probe_prio;
	u32 hog_prio;
	s32 busy_nice;        /* nice of the busy task (-20..19) */
	u32 tick_us;          /* work of the tick task after each wakeup */
	u32 lock_hold_us;     /* lock workload: time the lock is held per acquisition */
	u32 lock_gap_us;      /* lock workload: work outside the lock between acquisitions */
	u32 lock_tick_us;     /* lock workload: period of the kernel's timer tick (0: none) */
	u32 lock_busy_us;     /* lock workload: contend only this long of every interval, halt the rest (0: always) */
	u32 pvsched_enabled;  /* pvsched=0 turns the driver off */
	u32 pvsched_version;  /* what the guest speaks (knob forces it) */
	u32 pvsched_features; /* what the guest asks for */
	u32 force_features;   /* pvsched_features= given: ask it unmasked */
	u32 timer_oneshot;    /* timer=oneshot: LAPIC one-shot even with TSC-deadline */
	u32 nr_vcpus;
	u8 nr_phases[TG_MAX_VCPUS];
	u8 phases[TG_MAX_VCPUS][TG_MAX_PHASES];
};

/* Defaults, then parse `cmdline` for nr_vcpus vCPUs.  0, or -1 with a reason in err. */
int tg_parse_cmdline(const char *cmdline, u32 nr_vcpus, struct tg_config *c,
		     char *err, u32 errlen);

/* Name of a workload as the command line spells it. */
const char *tg_workload_name(u32 w);

#endif
