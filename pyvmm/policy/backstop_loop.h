/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The backstop loop: a native thread in the policy process that runs the BPF
 * backstop program for every vCPU every period, see backstop_loop.c. This
 * header is both backstop_loop.c's and backstop_loop.py's view of the API
 * (cffi reads it after the preprocessor, build/backstop_loop.cdef from
 * cdef.mk).  Include <stdint.h> before it.
 */

enum {
	/* with a heartbeat: the longest sleep, so the VMM's guardian (stale after 250 ms) sees it move */
	PVSCHED_BACKSTOP_BEAT_MS = 100,
	/* a ring-buffer record left unconsumed this long means a stuck actuator: the beat is withheld */
	PVSCHED_BACKSTOP_HANG_MS = 100,
};

struct pvsched_backstop_loop_info {
	uint64_t rounds;       /* periods run (one backstop run per vCPU each) */
	uint64_t runs;         /* backstop program runs */
	uint64_t errors;       /* BPF_PROG_TEST_RUN calls that failed */
	uint64_t late;         /* rounds that started more than a period late (then the schedule restarts) */
	uint64_t max_round_ns; /* longest round, wake-up to sleep */
	uint64_t beats;        /* heartbeats written */
	uint64_t withheld;     /* wake-ups that withheld the beat: a record waited > PVSCHED_BACKSTOP_HANG_MS */
	int32_t prio;          /* the thread's SCHED_FIFO priority, 0 if it could not get RT */
	int32_t last_errno;    /* of the last failed run */
	int32_t nr_vcpus;
	int32_t running;       /* 1 while the thread runs */
};

struct pvsched_backstop_loop;

struct pvsched_backstop_loop *pvsched_backstop_loop_new(int prog_fd);
int pvsched_backstop_loop_set_vcpus(struct pvsched_backstop_loop *l, int n, const uint32_t *tids,
				    const uint64_t *slot_uaddrs);
int pvsched_backstop_loop_set_heartbeat(struct pvsched_backstop_loop *l, uint64_t *beats, int ringbuf_fd);
void pvsched_backstop_loop_set_period(struct pvsched_backstop_loop *l, int period_ms);
int pvsched_backstop_loop_start(struct pvsched_backstop_loop *l, int period_ms, int prio);
void pvsched_backstop_loop_stop(struct pvsched_backstop_loop *l);
void pvsched_backstop_loop_info(struct pvsched_backstop_loop *l, struct pvsched_backstop_loop_info *out);
void pvsched_backstop_loop_free(struct pvsched_backstop_loop *l);
