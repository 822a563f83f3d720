/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The actuator loop: the native thread in the policy process that consumes the
 * policy's ring buffer and applies each record to its vCPU thread
 * (sched_setattr), see actuator_loop.c.  This header is both actuator_loop.c's
 * and actuator.py's view of the API (cffi reads it after the preprocessor,
 * build/actuator_loop.cdef from cdef.mk).  Include <stdint.h> before it.
 */

enum {
	/* the guests' counters (boosts, throttles, boosted time) are copied into their host areas this often */
	PVSCHED_ACTUATOR_COUNTERS_MS = 1000,
	/* event-to-sched_setattr latencies kept (the latest ones) */
	PVSCHED_ACTUATOR_LATENCY_SAMPLES = 4096,
	/* vCPUs that left (exited, or their TID is no longer the VMM's) waiting for Python to read them */
	PVSCHED_ACTUATOR_GONE_QUEUE = 64,
	/* sources counted per throttle: enum pvsched_source's values */
	PVSCHED_ACTUATOR_SOURCES = 8,
};

/* Why a vCPU left the loop's care: what Python logs, and whether the policy forgets its map entry. */
enum pvsched_gone_why {
	PVSCHED_GONE_EXITED = 1,     /* its EXITED record: the thread ended */
	PVSCHED_GONE_NOT_OURS = 2,   /* its TID is no longer a thread of its VMM */
	PVSCHED_GONE_ESRCH = 3,      /* sched_setattr found no such thread */
};

struct pvsched_actuator_gone {
	uint32_t tid;
	uint32_t why;                /* enum pvsched_gone_why */
};

struct pvsched_actuator_loop_info {
	uint64_t events;             /* ring-buffer records consumed */
	uint64_t applied;            /* sched_setattr calls that changed a thread */
	uint64_t stale;              /* records for a vCPU no longer registered, gone, or out of order */
	uint64_t errors;             /* sched_setattr failures */
	uint64_t rechecks;           /* slot re-reads the kernel clock asked for */
	uint64_t recheck_errors;     /* of those, backstop runs that failed */
	uint64_t wakeups;            /* wake-ups of the thread */
	uint64_t refreshes;          /* counter refreshes */
	uint64_t throttles[PVSCHED_ACTUATOR_SOURCES]; /* throttles applied, by enum pvsched_source */
	uint64_t latency_count;      /* latencies recorded in all (the last LATENCY_SAMPLES are kept) */
	uint64_t locked_bytes;       /* what the loop locked in memory for its thread */
	int32_t prio;                /* the thread's SCHED_FIFO priority, 0 if it could not get RT */
	int32_t running;             /* 1 while the thread runs */
	int32_t nr_vcpus;
	int32_t last_errno;          /* of the last failed sched_setattr */
	int32_t gone_dropped;        /* gone notices lost to a full queue */
	int32_t tid;                 /* the thread's TID while it runs */
};

struct pvsched_actuator_vcpu {
	uint32_t tid;
	uint32_t state;              /* enum pvsched_host_state last applied */
	int32_t policy;              /* the attributes last applied */
	int32_t priority;
	int32_t nice;
	uint32_t gone;
	uint32_t errors;
	uint32_t pad;
	uint64_t gen;
};

struct pvsched_actuator_loop;

struct pvsched_actuator_loop *pvsched_actuator_loop_new(int ringbuf_fd, int backstop_prog_fd, int vcpus_map_fd,
							int *err);
int pvsched_actuator_loop_add(struct pvsched_actuator_loop *l, uint32_t tid, uint32_t pid, uint64_t slot_uaddr,
			      int32_t policy, int32_t priority, int32_t nice);
int pvsched_actuator_loop_remove(struct pvsched_actuator_loop *l, uint32_t tid, int restore);
int pvsched_actuator_loop_vcpu(struct pvsched_actuator_loop *l, uint32_t tid, struct pvsched_actuator_vcpu *out);
int pvsched_actuator_loop_gone(struct pvsched_actuator_loop *l, struct pvsched_actuator_gone *out, int max);
int pvsched_actuator_loop_notify_fd(struct pvsched_actuator_loop *l);
void pvsched_actuator_loop_refresh(struct pvsched_actuator_loop *l);
int pvsched_actuator_loop_latencies(struct pvsched_actuator_loop *l, uint64_t *out, int max);
int pvsched_actuator_loop_start(struct pvsched_actuator_loop *l, int prio);
void pvsched_actuator_loop_stop(struct pvsched_actuator_loop *l);
void pvsched_actuator_loop_info(struct pvsched_actuator_loop *l, struct pvsched_actuator_loop_info *out);
void pvsched_actuator_loop_free(struct pvsched_actuator_loop *l);
/* The rule the loop applies to every record: what may be applied for `want` (policy, priority, nice). */
void pvsched_actuator_clamp(const int32_t want[3], const int32_t original[3], int32_t out[3]);
