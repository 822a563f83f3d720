/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Types and constants shared by the BPF policy (pvsched.bpf.c) and its
 * userspace (the Python modules in bpf/, through cffi's cdef of `cc -E -P`): map values, the
 * ring-buffer event, the stats index.  Guest/host ABI types come from the one
 * ABI header; nothing here is copied by hand on the Python side.
 *
 * Same rules as the ABI header: enums instead of #defines, __u32-style types
 * provided by the consumer (vmlinux.h in BPF, a typedef prologue in Python),
 * _Static_assert size checks behind PVSCHED_ABI_NO_ASSERTS.
 */
#ifndef PVSCHED_POLICY_H
#define PVSCHED_POLICY_H

#include "../abi/pvsched_abi.h"

enum pvsched_policy_limits {
	PVSCHED_SLOT_READ_TRIES = 4,   /* seqcount retries before ignoring */
	/* the RT ladder (PVSCHED_RT_PRIO_LIMIT, PVSCHED_ACTUATOR_PRIO, ...) is the ABI header's */
	/* a change that keeps the state (nice 5 -> 6, RR 8 -> 9) is posted at most this often per vCPU */
	PVSCHED_MIN_POST_INTERVAL_US = 1000,
	PVSCHED_RINGBUF_BYTES = 256 * 1024,
	/* VMs one host's programs serve (the outer maps' size), and programs in the object */
	PVSCHED_MAX_VMS = 256,
	PVSCHED_MAX_PROGS = 16,
	/* the vmm_bits map: one bit per possible tgid (PID_MAX_LIMIT, 4194304 on 64-bit), 64 to a word */
	PVSCHED_TGID_WORDS = 4194304 / 64,
	/* the host budget's share of all CPUs until the host's admin sets one (pyvmm host-budget) */
	PVSCHED_HOST_SHARE_DEFAULT_PCT = 50,
	PVSCHED_HOST_WINDOW_DEFAULT_MS = 100,
};

/* Tunable boost_on_halt: when a halting vCPU gets the halt boost. */
enum pvsched_halt_boost {
	PVSCHED_HALT_BOOST_NEVER = 0,
	PVSCHED_HALT_BOOST_ALWAYS = 1, /* every halt */
	PVSCHED_HALT_BOOST_AUTO = 2,   /* guests with F_RT_WAITER: only a halt with RT_WAITING; others: always */
};

/* Where an evaluation comes from (debug output and the event's reason). */
enum pvsched_source {
	PVSCHED_SRC_PREEMPT = 0,  /* switched out while runnable: VMEXIT-like */
	PVSCHED_SRC_BLOCK = 1,    /* switched out blocked, slot not IDLE */
	PVSCHED_SRC_HALT = 2,     /* switched out blocked, slot IDLE */
	PVSCHED_SRC_WAKEUP = 3,   /* sched_wakeup of a halted vCPU */
	PVSCHED_SRC_IRQ = 4,      /* interrupt injected (kvm_inj_virq, accept_irq) */
	PVSCHED_SRC_KVM_EXIT = 5, /* kvm:kvm_exit, where it fires */
	PVSCHED_SRC_BACKSTOP = 6, /* the policy process's periodic check */
	PVSCHED_SRC_CLOCK = 7,    /* the in-kernel throttle clock (BPF timer) */
};

/* Why a change was posted. */
enum pvsched_reason {
	PVSCHED_REASON_NONE = 0,
	PVSCHED_REASON_URGENT = 1,     /* critical section or wake hint */
	PVSCHED_REASON_RT_TASK = 2,    /* FIFO/RR guest task, translated 1:1 */
	PVSCHED_REASON_NORMAL = 3,     /* non-urgent, non-RT request */
	PVSCHED_REASON_HALT = 4,       /* boost at halt, held while idle */
	PVSCHED_REASON_IRQ = 5,        /* wakeup / interrupt of a halted vCPU */
	PVSCHED_REASON_THROTTLE = 6,   /* boosted too long in the window */
	PVSCHED_REASON_UNTHROTTLE = 7, /* throttle_ms over */
	PVSCHED_REASON_TUNABLES = 8,   /* re-evaluation after set_tunables */
	PVSCHED_REASON_VM_BUDGET = 9,  /* the VM's vCPUs together used their share in the window */
	PVSCHED_REASON_HOST_BUDGET = 10, /* the boosted vCPUs of all VMs together used the host's share */
};

enum pvsched_event_kind {
	PVSCHED_EV_APPLY = 0,  /* apply params + state to the TID */
	PVSCHED_EV_EXITED = 1, /* the vCPU thread exited */
	PVSCHED_EV_RECHECK = 2, /* re-read this vCPU's slot now (the clock saw it run boosted for clock_ms unread) */
};

/*
 * Per-CPU counters, indexed by this enum.  The comment after each entry is
 * its description: userspace reads it from this file (one source).
 */
enum pvsched_stat {
	PVSCHED_STAT_SWITCH_IN = 0,     /* vCPU thread switched in (VMENTER-like) */
	PVSCHED_STAT_PREEMPT = 1,       /* vCPU thread switched out while runnable (VMEXIT-like) */
	PVSCHED_STAT_BLOCK = 2,         /* vCPU thread blocked with a non-IDLE slot (lock/GIL, not a halt) */
	PVSCHED_STAT_HALT = 3,          /* vCPU thread blocked with an IDLE slot (halt) */
	PVSCHED_STAT_WAKEUP = 4,        /* sched_wakeup of a vCPU thread */
	PVSCHED_STAT_IRQ = 5,           /* interrupt injection seen for a vCPU in VMM context */
	PVSCHED_STAT_KVM_EXIT = 6,      /* kvm_exit of a vCPU thread */
	PVSCHED_STAT_KVM_ENTRY = 7,     /* kvm_entry of a vCPU thread */
	PVSCHED_STAT_VCPU_WAKEUP = 8,   /* kvm_vcpu_wakeup (halt ended) in VMM context */
	PVSCHED_STAT_SET_IRQ = 9,       /* kvm_set_irq in VMM context (names only a GSI) */
	PVSCHED_STAT_OTHER_CTX = 10,    /* KVM event outside the VMM process: skipped */
	PVSCHED_STAT_BACKSTOP = 11,     /* backstop evaluations (policy process timer) */
	PVSCHED_STAT_SLOT_FAULT = 12,   /* slot read faulted: evaluation skipped */
	PVSCHED_STAT_SLOT_TORN = 13,    /* slot seqcount odd/changed on every try: ignored */
	PVSCHED_STAT_SLOT_RETRY = 14,   /* slot seqcount retries that then succeeded */
	PVSCHED_STAT_UNCHANGED = 15,    /* evaluations whose result was already applied */
	PVSCHED_STAT_HOLD = 16,         /* evaluations that kept a halt boost (slot still IDLE) */
	PVSCHED_STAT_POSTED = 17,       /* changes posted to the actuator */
	PVSCHED_STAT_BOOST = 18,        /* NORMAL -> BOOSTED transitions */
	PVSCHED_STAT_UNBOOST = 19,      /* BOOSTED -> NORMAL transitions */
	PVSCHED_STAT_THROTTLE = 20,     /* BOOSTED -> THROTTLED (max_boost_runtime exceeded) */
	PVSCHED_STAT_UNTHROTTLE = 21,   /* THROTTLED -> NORMAL (throttle_ms over) */
	PVSCHED_STAT_THROTTLED_IGNORED = 22, /* requests ignored while THROTTLED */
	PVSCHED_STAT_RB_DROP = 23,      /* ring buffer full: change not posted (retried later) */
	PVSCHED_STAT_LOCK_BUSY = 24,    /* evaluation skipped: another CPU held the vCPU entry */
	PVSCHED_STAT_EXITED = 25,       /* vCPU threads that exited */
	PVSCHED_STAT_CLOCK = 26,        /* throttle-clock checks of a boosted or throttled vCPU (BPF timer) */
	PVSCHED_STAT_RECHECK = 27,      /* slot re-reads the clock asked of the policy process (boosted, running, unread) */
	PVSCHED_STAT_CLOCK_LATE = 28,   /* clock ticks more than clock_ms late (softirqs deferred to a starved ksoftirqd) */
	PVSCHED_STAT_POST_LIMITED = 29, /* changes within one state held back: less than the minimum interval since the last post */
	PVSCHED_STAT_VM_BUDGET = 30,    /* boosts ended (throttled) or refused: the VM's vCPUs together used vm_boost_share_pct */
	PVSCHED_STAT_SWITCH_VMM = 31,   /* sched_switch runs past the tgid check: a thread of this VMM switched in or out */
	PVSCHED_STAT_HOST_BUDGET = 32,  /* boosts ended (throttled) or refused: all VMs' boosted vCPUs together used the host's share */
	PVSCHED_STAT_SWITCH_UNSEEN = 33, /* a boosted vCPU found on a CPU that no sched_switch switched in: marked running from then */
	PVSCHED_STAT_NR = 34,
};

/* Scheduling parameters as sched_setattr takes them. */
struct pvsched_sched_params {
	__s32 policy;
	__u32 rt_priority;
	__s32 nice;
	__u32 pad;
};

/* A validated copy of a slot's guest area (its first 24 bytes, same layout). */
struct pvsched_slot_snap {
	__u32 seq;
	__u32 flags;
	__s32 policy;
	__u32 rt_priority;
	__s32 nice;
	__u32 wake_hint;
};

/* Value of the vcpus hash map, keyed by the vCPU thread's TID. */
struct pvsched_vcpu {
	/* written by userspace once, at registration */
	__u32 vm_id;
	__u32 vcpu_id;
	__u32 features;                     /* the guest's negotiated pvsched features */
	__u32 pad0;
	__u64 slot_hva;                     /* slot address in the VMM process */
	struct pvsched_sched_params orig;   /* attributes restored for NORMAL */
	/* owned by the BPF programs after registration */
	__u32 lock;                         /* try-lock between CPUs, never spun on */
	__u32 state;                        /* enum pvsched_host_state, as posted */
	struct pvsched_sched_params posted; /* last params posted to the actuator */
	__u32 running;                      /* on a CPU now (written by sched_switch; the clock sets it for a
					       boosted vCPU whose switch-in no sched_switch showed) */
	__u32 hold;                         /* halt boost held while the slot shows IDLE */
	__u32 halted;                       /* last switch-out was a halt, not yet seen busy */
	__u32 halt_boost;                   /* that halt wanted the boost (boost_on_halt) */
	__u32 urgent_seq;                   /* slot seq of the critical section last found needing the boost */
	__u32 reason;                       /* enum pvsched_reason of the last change */
	__u64 run_start_ns;                 /* switched in at (written with `running`) */
	__u64 acct_ns;                      /* boosted run time counted up to here */
	__u64 boost_since_ns;               /* BOOSTED since (posting time) */
	__u64 window_start_ns;
	__u64 window_boosted_ns;            /* boosted run time in the current window */
	__u64 throttle_until_ns;
	__u64 boosts;
	__u64 throttles;
	__u64 boosted_ns;                   /* total boosted run time charged (the thread's own, steal excluded) */
	__u64 gen;                          /* changes posted */
	__u64 last_eval_ns;
	__u64 slot_read_ns;                 /* last evaluation with a valid slot read */
	struct pvsched_slot_snap last_slot; /* last valid slot read, for show() */
	__u64 last_post_ns;                 /* when the last change was posted (PVSCHED_MIN_POST_INTERVAL_US) */
	/* the thread's own run time (task_runtime()) at run_start_ns, acct_ns and boost_since_ns; 0: unknown */
	__u64 run_start_exec_ns;            /* written with run_start_ns */
	__u64 acct_exec_ns;
	__u64 boost_exec_ns;
	__u64 boosted_wall_ns;              /* boosted wall time, steal included (boosted_ns is what was charged) */
	__u64 run_start_clock;              /* the thread's se.exec_start at run_start_ns (its run queue's task
					       clock); 0: unknown (running_runtime()).  Written with run_start_ns */
};

/*
 * Run-time tunables: array map with one entry, written whole by userspace
 * (validated there; ms converted to ns there, once).
 */
struct pvsched_tunables {
	__s32 boost_policy;          /* SCHED_RR or SCHED_FIFO */
	__u32 boost_prio;            /* urgent, halt and interrupt boosts */
	__u32 max_rt_prio;           /* cap on every RT priority (<= PVSCHED_RT_PRIO_LIMIT) */
	__u32 allow_fifo;            /* 0: FIFO requests become RR */
	__s32 min_nice;              /* floor for translated nice values */
	__u32 boost_on_halt;         /* enum pvsched_halt_boost */
	__u32 debug;                 /* 0 off, 1 decisions, 2 every event (bpf_printk) */
	__u32 section_boost;         /* 1: a critical-section boost ends with its section; 0: while any flag shows */
	__u64 max_boost_runtime_ns;
	__u64 throttle_window_ns;
	__u64 throttle_ns;
	__u64 backstop_ns;           /* the policy process's slot re-read period, kept here for show() */
	__u64 clock_ns;              /* throttle clock period (BPF timer): read at every tick */
	__u64 vm_boost_budget_ns;    /* boosted run time of all vCPUs together per window (vm_boost_share_pct
	                              * of the host's CPUs); one VM's own map */
};

/* The stats map's one entry, per CPU: one lookup per event, then each count is an add. */
struct pvsched_stats {
	__u64 count[PVSCHED_STAT_NR];
};

/* The VM's boosted run time in the current window, all vCPUs together (the vm_budget map's one entry). */
struct pvsched_vm_budget {
	__u64 window;                /* now / throttle_window_ns of the window counted */
	__u64 boosted_ns;
};

/*
 * The host's budget: boosted run time of every VM's vCPUs together per window
 * (the host_budget map's one entry, pinned once per host and shared by every
 * VM's programs).  window_ns and budget_ns are the admin's (pyvmm
 * host-budget); the programs only count.  window_ns 0: no host budget.
 */
struct pvsched_host_budget {
	__u64 window;                /* now / window_ns of the window counted */
	__u64 boosted_ns;
	__u64 window_ns;
	__u64 budget_ns;             /* share_pct of ncpus CPUs over window_ns */
	__u32 share_pct;
	__u32 ncpus;
};

/* Ring-buffer record: one change for the actuator to apply. */
struct pvsched_event {
	__u64 ts_ns;                 /* bpf_ktime_get_ns() at posting (CLOCK_MONOTONIC) */
	__u64 gen;
	__u32 kind;                  /* enum pvsched_event_kind */
	__u32 tid;
	__u32 vm_id;
	__u32 vcpu_id;
	__u32 state;                 /* enum pvsched_host_state */
	__u32 reason;                /* enum pvsched_reason */
	__u32 source;                /* enum pvsched_source */
	__u32 pad;
	struct pvsched_sched_params params;
	__u64 boosts;
	__u64 throttles;
	__u64 boosted_ns;
};

/* The host_ids map's entry for one program of the object (in the object's order): what a later VM shares. */
struct pvsched_prog_ids {
	__u32 prog_id;
	__u32 link_id;               /* 0: not attached (a syscall program, or absent from this kernel) */
};

/* Context of the backstop program (BPF_PROG_TEST_RUN of a syscall prog). */
struct pvsched_backstop_ctx {
	__u32 tid;
	__u32 reason;                /* enum pvsched_reason to force, or NONE */
	__u64 slot_uaddr;            /* slot in the policy process's memfd mapping */
};

#ifndef PVSCHED_ABI_NO_ASSERTS
_Static_assert(sizeof(struct pvsched_sched_params) == 16, "params");
_Static_assert(sizeof(struct pvsched_slot_snap) == 24, "snap");
_Static_assert(__builtin_offsetof(struct pvsched_slot_snap, wake_hint) ==
	       __builtin_offsetof(struct pvsched_guest_area, wake_hint), "snap mirrors the guest area");
_Static_assert(sizeof(struct pvsched_vcpu) == 256, "vcpu");
_Static_assert(sizeof(struct pvsched_tunables) == 80, "tunables");
_Static_assert(sizeof(struct pvsched_vm_budget) == 16, "vm budget");
_Static_assert(sizeof(struct pvsched_host_budget) == 40, "host budget");
_Static_assert(sizeof(struct pvsched_event) == 88, "event");
_Static_assert(sizeof(struct pvsched_backstop_ctx) == 16, "backstop ctx");
_Static_assert(sizeof(struct pvsched_prog_ids) == 8, "prog ids");
#endif

#endif /* PVSCHED_POLICY_H */
