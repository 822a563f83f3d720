// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The backstop loop: one native thread in the policy process that runs the
 * BPF backstop program (pvs_backstop, through BPF_PROG_TEST_RUN) for every
 * vCPU every period, without Python.
 *
 * The backstop re-reads every slot, so a boost that is no longer asked for
 * ends even when no event comes (the vCPU never leaves its CPU), and it is
 * the throttle's fallback when the kernel clock's softirq is deferred to
 * ksoftirqd.  It runs at SCHED_FIFO (the actuator's priority, above every
 * boosted vCPU), so each wake-up preempts a vCPU it serves: it is native
 * because a wake-up of a Python thread runs a cold interpreter and costs
 * several times more.  What is event-driven (the ring buffer, sched_setattr,
 * and once a second the guest's counters) is the actuator loop's, another
 * native thread at the same priority (actuator_loop.c).
 *
 * The heartbeat.  The VMM's guardian kills a policy process whose heartbeat
 * stops for 250 ms.  This thread writes it (at least every
 * PVSCHED_BACKSTOP_BEAT_MS), so the actuator need not wake just to beat,
 * but it beats only while the actuator keeps up: when a ring-buffer
 * record has waited unconsumed for PVSCHED_BACKSTOP_HANG_MS (the consumer
 * position has not moved), the actuator is stuck and the beat is withheld.
 * An actuator with nothing to apply is idle, not hung: whatever the policy
 * decides (a throttle, a recheck) is a record.
 *
 * The thread blocks every signal (they are Python's), sleeps on a condition
 * variable against CLOCK_MONOTONIC (so a new period or a stop takes effect at
 * once), and never catches up: a round that starts more than a period late
 * restarts the schedule from now, counted in `late`.
 *
 * The period is a mean: each gap is drawn from 0.75-1.25 of it.  A fixed
 * grid phase-locks with a guest's own periodic timer (a 1 ms probe, a tick),
 * and then every round lands in the same few microseconds after that vCPU
 * wakes: on 2026-12-06 one busy-host boot had 248 of its 250 rounds preempt
 * a boosted vCPU 63-78 us after its switch-in, for 39 us each (5% of that
 * vCPU's samples), where other boots had 2-8.  The jitter leaves the mean
 * cost as it was and spreads it over the guest's samples.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pvsched_policy.h"
#include "backstop_loop.h"
#include "backstop_run.h"

#define STACK_SIZE (64 * 1024) /* locked whole (see loop_main): a default 8 MiB stack would be resident */
#define NSEC 1000000000LL

struct pvsched_backstop_loop {
	pthread_mutex_t life;       /* start and stop, one caller at a time (pvsched_backstop_loop_stop) */
	pthread_mutex_t lock;
	pthread_cond_t wake;        /* CLOCK_MONOTONIC */
	pthread_t thread;
	int prog_fd;
	int started;
	int stop;
	int reschedule;             /* the period or the heartbeat changed: restart the schedule from now */
	int prio;                   /* requested SCHED_FIFO priority, 0 for none */
	int64_t period_ns;
	uint64_t *beats;            /* the heartbeat word, or NULL */
	const unsigned long *cons;  /* the ring buffer's consumer and producer positions (read-only mapping) */
	const unsigned long *prod;
	void *rb_map;
	size_t rb_len;
	unsigned long last_cons;
	int64_t pending_since;      /* a record has been waiting since then (0: none waiting) */
	uint64_t rng;               /* xorshift64 state of the rounds' jitter (never 0) */
	int n;
	struct pvsched_backstop_ctx ctx[PVSCHED_MAX_VCPUS];
	struct pvsched_backstop_loop_info info;
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * NSEC + ts.tv_nsec;
}

static struct timespec to_ts(int64_t ns)
{
	return (struct timespec){ .tv_sec = ns / NSEC, .tv_nsec = ns % NSEC };
}

/* The gap to the next round: uniform in 0.75-1.25 of the period (under l->lock). */
static int64_t next_gap(struct pvsched_backstop_loop *l)
{
	uint64_t x = l->rng;
	int64_t spread = l->period_ns / 2;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	l->rng = x;
	return l->period_ns - spread / 2 + (int64_t)(x % (uint64_t)(spread + 1));
}

/* Beat, unless a ring-buffer record has waited unconsumed for PVSCHED_BACKSTOP_HANG_MS (under l->lock). */
static void heartbeat(struct pvsched_backstop_loop *l, int64_t now)
{
	unsigned long cons, prod;

	if (!l->beats)
		return;
	cons = __atomic_load_n(l->cons, __ATOMIC_ACQUIRE);
	prod = __atomic_load_n(l->prod, __ATOMIC_ACQUIRE);
	if (cons == prod)
		l->pending_since = 0;
	else if (cons != l->last_cons || !l->pending_since)
		l->pending_since = now;
	l->last_cons = cons;
	if (l->pending_since && now - l->pending_since >= PVSCHED_BACKSTOP_HANG_MS * 1000000LL) {
		l->info.withheld++;
		return;
	}
	__atomic_add_fetch(l->beats, 1, __ATOMIC_RELAXED);
	l->info.beats++;
}

/* This RT thread must never page-fault: its stack is locked (its state is, in new(); its code is, by the
 * actuator loop's start, actuator_loop.c).  Without CAP_IPC_LOCK it runs unlocked. */
static void lock_own_stack(void)
{
	pthread_attr_t attr;
	void *addr;
	size_t size;

	if (pthread_getattr_np(pthread_self(), &attr) != 0)
		return;
	if (pthread_attr_getstack(&attr, &addr, &size) == 0)
		mlock(addr, size);
	pthread_attr_destroy(&attr);
}

static void *loop_main(void *arg)
{
	struct pvsched_backstop_loop *l = arg;
	struct pvsched_backstop_ctx ctx[PVSCHED_MAX_VCPUS];
	struct sched_param sp = { .sched_priority = l->prio };
	int64_t due, start, took, wake;
	int n, i, rc, errs, last;
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	lock_own_stack();
	pthread_mutex_lock(&l->lock);
	l->info.prio = l->prio > 0 && pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0 ? l->prio : 0;
	due = now_ns() + l->period_ns;
	for (;;) {
		struct timespec ts;

		wake = l->beats ? now_ns() + PVSCHED_BACKSTOP_BEAT_MS * 1000000LL : due;
		if (due < wake)
			wake = due;
		ts = to_ts(wake);
		rc = 0;
		while (!l->stop && !l->reschedule && rc != ETIMEDOUT)
			rc = pthread_cond_timedwait(&l->wake, &l->lock, &ts);
		if (l->stop)
			break;
		if (l->reschedule) {
			l->reschedule = 0;
			due = now_ns() + l->period_ns;
			continue;
		}
		start = now_ns();
		if (start >= due) {
			n = l->n;
			memcpy(ctx, l->ctx, n * sizeof(ctx[0]));
			pthread_mutex_unlock(&l->lock);

			for (i = errs = last = 0; i < n; i++) {
				rc = pvsched_backstop_run(l->prog_fd, &ctx[i]);
				if (rc < 0) {
					errs++;
					last = -rc;
				}
			}
			took = now_ns() - start;

			pthread_mutex_lock(&l->lock);
			l->info.rounds++;
			l->info.runs += n;
			l->info.errors += errs;
			if (errs)
				l->info.last_errno = last;
			if (took > (int64_t)l->info.max_round_ns)
				l->info.max_round_ns = took;
			if (start - due > l->period_ns) {
				l->info.late++;
				due = start;
			}
			due += next_gap(l);
		}
		heartbeat(l, now_ns());
	}
	l->info.running = 0;
	pthread_mutex_unlock(&l->lock);
	return NULL;
}

struct pvsched_backstop_loop *pvsched_backstop_loop_new(int prog_fd)
{
	/* Its own mapping, locked: calloc'd memory would share pages with the Python heap, which is not. */
	struct pvsched_backstop_loop *l = mmap(NULL, sizeof(*l), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
					       -1, 0);
	pthread_condattr_t ca;

	if (l == MAP_FAILED)
		return NULL;
	mlock(l, sizeof(*l));
	l->prog_fd = prog_fd;
	l->period_ns = NSEC / 50;
	pthread_mutex_init(&l->life, NULL);
	pthread_mutex_init(&l->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&l->wake, &ca);
	pthread_condattr_destroy(&ca);
	return l;
}

int pvsched_backstop_loop_set_vcpus(struct pvsched_backstop_loop *l, int n, const uint32_t *tids,
				    const uint64_t *slot_uaddrs)
{
	int i;

	if (n < 0 || n > PVSCHED_MAX_VCPUS)
		return -EINVAL;
	pthread_mutex_lock(&l->lock);
	for (i = 0; i < n; i++)
		l->ctx[i] = (struct pvsched_backstop_ctx){ .tid = tids[i], .reason = PVSCHED_REASON_NONE,
							   .slot_uaddr = slot_uaddrs[i] };
	l->n = n;
	l->info.nr_vcpus = n;
	pthread_mutex_unlock(&l->lock);
	return 0;
}

int pvsched_backstop_loop_set_heartbeat(struct pvsched_backstop_loop *l, uint64_t *beats, int ringbuf_fd)
{
	size_t page = sysconf(_SC_PAGESIZE), len = 2 * page;
	void *map = NULL, *old;
	size_t old_len;

	if (beats) {
		/* consumer page, then producer page: read-only (libbpf's own mapping is the consumer) */
		map = mmap(NULL, len, PROT_READ, MAP_SHARED, ringbuf_fd, 0);
		if (map == MAP_FAILED)
			return -errno;
	}
	pthread_mutex_lock(&l->lock);
	old = l->rb_map;
	old_len = l->rb_len;
	l->beats = beats;
	l->rb_map = map;
	l->rb_len = beats ? len : 0;
	l->cons = beats ? (const unsigned long *)map : NULL;
	l->prod = beats ? (const unsigned long *)((char *)map + page) : NULL;
	l->pending_since = 0;
	l->reschedule = 1; /* re-plan the sleep: at most PVSCHED_BACKSTOP_BEAT_MS from now on */
	pthread_cond_signal(&l->wake);
	pthread_mutex_unlock(&l->lock);
	if (old)
		munmap(old, old_len);
	return 0;
}

void pvsched_backstop_loop_set_period(struct pvsched_backstop_loop *l, int period_ms)
{
	pthread_mutex_lock(&l->lock);
	if (period_ms > 0 && (int64_t)period_ms * 1000000 != l->period_ns) {
		l->period_ns = (int64_t)period_ms * 1000000;
		l->reschedule = 1;
		pthread_cond_signal(&l->wake);
	}
	pthread_mutex_unlock(&l->lock);
}

int pvsched_backstop_loop_start(struct pvsched_backstop_loop *l, int period_ms, int prio)
{
	pthread_attr_t attr;
	int rc;

	if (period_ms <= 0)
		return -EINVAL;
	pthread_mutex_lock(&l->life);
	pthread_mutex_lock(&l->lock);
	if (l->started) {
		pthread_mutex_unlock(&l->lock);
		pthread_mutex_unlock(&l->life);
		return -EALREADY;
	}
	l->period_ns = (int64_t)period_ms * 1000000;
	l->rng = ((uint64_t)now_ns() ^ (uint64_t)(uintptr_t)l) | 1;
	l->prio = prio;
	l->stop = 0;
	l->reschedule = 0;
	l->info.running = 1;
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, STACK_SIZE);
	rc = pthread_create(&l->thread, &attr, loop_main, l);
	pthread_attr_destroy(&attr);
	l->started = rc == 0;
	if (rc)
		l->info.running = 0;
	pthread_mutex_unlock(&l->lock);
	pthread_mutex_unlock(&l->life);
	return -rc;
}

/* Stop and join the thread; idempotent, and safe from several threads at once (the actuator's watcher and
 * its stop() both stop this loop): `life` lets one caller join, because a thread joined twice is undefined
 * behaviour (glibc's second pthread_join waited forever). */
void pvsched_backstop_loop_stop(struct pvsched_backstop_loop *l)
{
	pthread_mutex_lock(&l->life);
	pthread_mutex_lock(&l->lock);
	if (!l->started) {
		pthread_mutex_unlock(&l->lock);
		pthread_mutex_unlock(&l->life);
		return;
	}
	l->stop = 1;
	pthread_cond_signal(&l->wake);
	pthread_mutex_unlock(&l->lock);
	pthread_join(l->thread, NULL);
	pthread_mutex_lock(&l->lock);
	l->started = 0;
	pthread_mutex_unlock(&l->lock);
	pthread_mutex_unlock(&l->life);
}

void pvsched_backstop_loop_info(struct pvsched_backstop_loop *l, struct pvsched_backstop_loop_info *out)
{
	pthread_mutex_lock(&l->lock);
	*out = l->info;
	pthread_mutex_unlock(&l->lock);
}

void pvsched_backstop_loop_free(struct pvsched_backstop_loop *l)
{
	if (!l)
		return;
	pvsched_backstop_loop_stop(l);
	pvsched_backstop_loop_set_heartbeat(l, NULL, -1);
	pthread_cond_destroy(&l->wake);
	pthread_mutex_destroy(&l->lock);
	pthread_mutex_destroy(&l->life);
	munmap(l, sizeof(*l));
}
