// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Host build of the test guest's lock workload (pyvmm/guest/testguest/critsec.h)
 * for tests/testguest/test_units.py, with threads as vCPUs and SIGUSR1 as the
 * kernel's interrupt (a signal, like an interrupt, lands between two
 * instructions; its handler runs the kernel's own interrupt-time slot writes):
 *   lock_harness race THREADS CYCLES HOLD_TSC SIGNALS  -> one JSON object
 *     THREADS contend the lock CYCLES times each while an observer thread reads
 *     the lock's gen and every slot the way the host does, and (SIGNALS 1) a
 *     signaller interrupts the threads as fast as it can.
 *   lock_harness nest                                 -> the slot after each step
 *     of a kernel write on its own and one nested in the task's open mark.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "critsec.h"

#define MAX_THREADS 8
#define PD PVSCHED_FLAG_PREEMPT_DISABLED

struct worker {
	struct pvsched_guest_area slot __attribute__((aligned(64)));
	pthread_t tid;
	u32 id;
	struct tg_lock_stats st;
	volatile u64 irqs, irqs_cs, nested;
};

static struct tg_spinlock lock;
static struct worker workers[MAX_THREADS];
static u32 nthreads;
static u64 cycles, hold;
static volatile int done;
static u32 finished;
static __thread struct worker *self;

/* What irq_running in kernel.c does to the slot, around nothing else. */
static void on_irq(int sig)
{
	struct worker *w = self;
	u32 nested, keep;

	(void)sig;
	if (!w)
		return;
	keep = tg_kslot_irq_enter(&w->slot, 1, &nested);
	w->irqs++;
	w->irqs_cs += keep != 0;
	w->nested += nested;
	tg_kslot_irq_exit(&w->slot, keep, 0, 0, 0, 2);
}

static void *work(void *arg)
{
	struct worker *w = arg;
	u64 i;

	self = w;
	for (i = 0; i < cycles; i++)
		tg_lock_cycle(&lock, &w->slot, w->id + 1, hold, &w->st);
	__atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
	return 0;
}

static void *signaller(void *arg)
{
	u64 *sent = arg;
	u32 i = 0;

	while (!done) {
		pthread_kill(workers[i].tid, SIGUSR1);
		(*sent)++;
		i = (i + 1) % nthreads;
	}
	return 0;
}

struct observed {
	u64 looks, unstable, torn, backwards, bad_flags;
	u64 free_with_pd;   /* no hold in progress, yet a slot showed PREEMPT_DISABLED */
	u64 other_with_pd;  /* a hold in progress, and a slot other than the holder's showed it */
	u64 held, held_pd;  /* looks during a hold, and those that saw the holder's slot marked */
};

/* One slot under its seqcount; 0 when it was being written. */
static int read_slot(struct worker *w, u32 *flags, u32 *seq)
{
	u32 s1 = READ_ONCE(w->slot.seq), s2;

	*flags = READ_ONCE(w->slot.flags);
	s2 = READ_ONCE(w->slot.seq);
	*seq = s1;
	return !(s1 & 1) && s1 == s2;
}

static void look(struct observed *o, u32 *last_seq)
{
	u64 g1 = READ_ONCE(lock.gen), g2;
	u32 owner = READ_ONCE(lock.owner), f[MAX_THREADS], i, seq;
	int ok = 1;

	for (i = 0; i < nthreads; i++) {
		if (!read_slot(&workers[i], &f[i], &seq)) {
			ok = 0;
			continue;
		}
		if (seq < last_seq[i])
			o->backwards++;
		last_seq[i] = seq;
		if (f[i] & ~(u32)(PD | PVSCHED_FLAG_IN_HARDIRQ))
			o->bad_flags++;
	}
	g2 = READ_ONCE(lock.gen);
	o->looks++;
	if (!ok) {
		o->torn++;
		return;
	}
	if (g1 != g2) {
		o->unstable++;
		return;
	}
	for (i = 0; i < nthreads; i++) {
		if (!(f[i] & PD))
			continue;
		if (!(g1 & 1))
			o->free_with_pd++;
		else if (owner != i + 1)
			o->other_with_pd++;
	}
	if (g1 & 1) {
		o->held++;
		if (owner >= 1 && owner <= nthreads && (f[owner - 1] & PD))
			o->held_pd++;
	}
}

static int race(int argc, char **argv)
{
	struct observed o = { 0 };
	u32 last_seq[MAX_THREADS] = { 0 }, i, end_bad = 0;
	u64 sent = 0, acq = 0, viol = 0, lost = 0, irqs = 0, cs = 0, nested = 0;
	int signals;
	pthread_t sig_tid;
	struct sigaction sa;

	if (argc != 6)
		return 2;
	nthreads = (u32)atoi(argv[2]);
	cycles = strtoull(argv[3], 0, 10);
	hold = strtoull(argv[4], 0, 10);
	signals = atoi(argv[5]);
	if (nthreads < 1 || nthreads > MAX_THREADS)
		return 2;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_irq;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, 0);
	for (i = 0; i < nthreads; i++) {
		workers[i].id = i;
		pthread_create(&workers[i].tid, 0, work, &workers[i]);
	}
	if (signals)
		pthread_create(&sig_tid, 0, signaller, &sent);
	while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < nthreads)
		look(&o, last_seq);
	for (i = 0; i < nthreads; i++)
		pthread_join(workers[i].tid, 0);
	done = 1;
	if (signals)
		pthread_join(sig_tid, 0);
	for (i = 0; i < nthreads; i++) {
		struct worker *w = &workers[i];

		acq += w->st.acquisitions;
		viol += w->st.violations;
		lost += w->st.flag_lost;
		irqs += w->irqs;
		cs += w->irqs_cs;
		nested += w->nested;
		end_bad += (w->slot.seq & 1) || w->slot.flags;
	}
	printf("{\"acquisitions\":%llu,\"gen\":%llu,\"violations\":%llu,\"flag_lost\":%llu,\"signals\":%llu,"
	       "\"irqs\":%llu,\"irqs_in_hold\":%llu,\"nested\":%llu,\"end_bad_slots\":%u,\"looks\":%llu,"
	       "\"unstable\":%llu,\"torn\":%llu,\"backwards\":%llu,\"bad_flags\":%llu,\"free_with_pd\":%llu,"
	       "\"other_with_pd\":%llu,\"held\":%llu,\"held_pd\":%llu}\n",
	       (unsigned long long)acq, (unsigned long long)lock.gen, (unsigned long long)viol,
	       (unsigned long long)lost, (unsigned long long)sent, (unsigned long long)irqs,
	       (unsigned long long)cs, (unsigned long long)nested, end_bad, (unsigned long long)o.looks,
	       (unsigned long long)o.unstable, (unsigned long long)o.torn, (unsigned long long)o.backwards,
	       (unsigned long long)o.bad_flags, (unsigned long long)o.free_with_pd,
	       (unsigned long long)o.other_with_pd, (unsigned long long)o.held, (unsigned long long)o.held_pd);
	return 0;
}

static void show(const char *step, const struct pvsched_guest_area *g, u32 extra)
{
	printf("%s{\"step\":\"%s\",\"seq\":%u,\"flags\":%u,\"policy\":%d,\"extra\":%u}", strcmp(step, "start") ? "," : "",
	       step, g->seq, g->flags, g->policy, extra);
}

/* A kernel write alone, then one that lands inside the task's mark after its first `incl`. */
static int nest(void)
{
	struct pvsched_guest_area g;
	u32 nested, keep;

	memset(&g, 0, sizeof(g));
	printf("[");
	g.seq = 4;
	g.flags = PD;
	show("start", &g, 0);
	keep = tg_kslot_irq_enter(&g, 1, &nested);
	show("enter", &g, keep | nested << 16);
	tg_kslot_irq_exit(&g, keep, 2, 0, 0, 2);
	show("exit", &g, 0);
	tg_slot_mark(&g, 0);
	show("unmark", &g, 0);
	g.seq++; /* the task's first `incl` of a mark that sets the flag */
	show("open", &g, 0);
	keep = tg_kslot_irq_enter(&g, 3, &nested);
	show("nested_enter", &g, keep | nested << 16);
	tg_kslot_irq_exit(&g, keep, 2, 0, 0, 4);
	show("nested_exit", &g, 0);
	g.flags = PD; /* the rest of the mark: its store and its closing `incl` */
	g.seq++;
	show("close", &g, 0);
	printf("]\n");
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 6 && !strcmp(argv[1], "race"))
		return race(argc, argv);
	if (argc == 2 && !strcmp(argv[1], "nest"))
		return nest();
	fprintf(stderr, "usage: see the comment at the top\n");
	return 2;
}
