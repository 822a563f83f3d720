/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The guardian: a native thread in the VMM that undoes the policy process's boosts
 * without Python (no GIL), see guardian.c. This header is both guardian.c's and
 * guardian.py's view of the API (cffi reads it after the preprocessor,
 * build/guardian.cdef from cdef.mk).  Include <stdint.h> before it.
 */

/* The guardian's SCHED_FIFO priority is the RT ladder's PVSCHED_GUARDIAN_PRIO (pvsched_abi.h). */
enum {
	/* wake-up period of the PF_EXITING and heartbeat checks (it never spins; a thread's exit also
	 * wakes it, through pidfds).  Each wake-up preempts a boosted vCPU and shows in the busy-host
	 * guest p99, so it wakes as rarely as the 100 ms restore bound allows: a death whose threads are
	 * stuck in do_exit is seen within 50 ms, a hang 250-300 ms after the last beat (the policy's
	 * backstop loop beats while its actuator keeps up: pyvmm/policy/backstop_loop.c). */
	PVSCHED_GUARDIAN_PERIOD_MS = 50,
	/* a heartbeat not seen moving this long means a hung policy process: 2.5 of its beats (at most
	 * 100 ms apart: PVSCHED_BACKSTOP_BEAT_MS), so a late beat is never taken for a hang */
	PVSCHED_GUARDIAN_STALE_MS = 250,
	PVSCHED_GUARDIAN_MAX_THREADS = 256,  /* PVSCHED_MAX_VCPUS of the ABI header (asserted in guardian.c) */
};

enum pvsched_guardian_state {
	PVSCHED_GUARDIAN_IDLE = 0,      /* not started */
	PVSCHED_GUARDIAN_WATCHING = 1,  /* policy process alive */
	PVSCHED_GUARDIAN_KILLED = 2,    /* heartbeat went stale: killed, threads restored, waiting for its death */
	PVSCHED_GUARDIAN_DONE = 3,      /* policy process gone, threads restored; the thread has ended */
	PVSCHED_GUARDIAN_STOPPED = 4,   /* stopped by pvsched_guardian_stop() while the policy process lived */
	PVSCHED_GUARDIAN_DYING = 5,     /* every thread of it is exiting: threads restored, waiting for it to be gone */
};

enum pvsched_guardian_cause {
	PVSCHED_GUARDIAN_CAUSE_NONE = 0,
	PVSCHED_GUARDIAN_CAUSE_DIED = 1,   /* the policy process ended or is ending (every thread in do_exit) */
	PVSCHED_GUARDIAN_CAUSE_STALE = 2,  /* its heartbeat stopped: the guardian killed it */
};

struct pvsched_guardian_info {
	int32_t state;          /* enum pvsched_guardian_state */
	int32_t cause;          /* enum pvsched_guardian_cause */
	int32_t prio;           /* the guardian thread's SCHED_FIFO priority, 0 if it could not get RT */
	int32_t locked;         /* 1 if its stack, state and code are locked in memory */
	int32_t armed;          /* 1 once a heartbeat was seen (liveness checked) and not disarmed */
	int32_t nr_threads;     /* vCPU threads it guards */
	int32_t restored;       /* threads restored by the first restore after the event */
	int32_t errors;         /* sched_setattr failures other than ESRCH (thread gone), all restores */
	int32_t last_errno;
	int32_t restores;       /* restore passes run */
	int32_t watched;        /* threads of the policy process with a PIDFD_THREAD pidfd polled */
	int32_t reserved0;
	uint64_t beats;         /* last heartbeat value seen */
	int64_t silent_ms;      /* stale kill: how long the heartbeat had not moved */
	int64_t event_ns;       /* CLOCK_MONOTONIC: dying or death noticed, or stale kill sent */
	int64_t restore_ns;     /* CLOCK_MONOTONIC: the first restore after the event finished */
};

struct pvsched_guardian;

struct pvsched_guardian *pvsched_guardian_new(void);
int pvsched_guardian_heartbeat_fd(struct pvsched_guardian *g);
int pvsched_guardian_set_threads(struct pvsched_guardian *g, int n, const int32_t *tids, const int32_t *policies,
				 const int32_t *priorities, const int32_t *nices);
int pvsched_guardian_start(struct pvsched_guardian *g, int pid, int pidfd, int prio, int period_ms, int stale_ms);
void pvsched_guardian_disarm(struct pvsched_guardian *g);
int pvsched_guardian_restore(struct pvsched_guardian *g);
int pvsched_guardian_stop(struct pvsched_guardian *g);
void pvsched_guardian_info(struct pvsched_guardian *g, struct pvsched_guardian_info *out);
void pvsched_guardian_free(struct pvsched_guardian *g);
