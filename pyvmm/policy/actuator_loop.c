// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The actuator loop: one native thread in the policy process that applies the
 * BPF policy's decisions.  It waits in poll() on the policy's ring buffer,
 * and for each record clamps the attributes, checks that the TID is still a
 * thread of its VMM, calls sched_setattr, and publishes what it applied in the
 * vCPU's host area (under the host seqcount).  Once a second it copies the
 * guests' counters (boosts, throttles, boosted time) from the vcpus map.
 *
 * Why native.  The thread runs at SCHED_FIFO (the actuator's priority, above
 * every boosted vCPU), so each wake-up preempts a vCPU it serves, and its
 * memory must never page-fault.  A Python thread there meant a cold
 * interpreter per wake-up and an mlockall() of the whole Python process; this
 * thread locks only what it touches: its state (one mapping), its stack, the
 * code of the policy's native libraries and libc (lock_code), and each
 * vCPU's slot page.  Python keeps registration, restore on request, and what
 * is slow and rare: the log lines and the map entry of a vCPU that left (the
 * gone queue), a vCPU's first failed sched_setattr, and the end of this thread,
 * each announced on an eventfd (notify_fd).
 *
 * The ring buffer is read through its own mappings (consumer page read-write,
 * producer page and data read-only), as the kernel's ring-buffer ABI
 * describes: nothing of libbpf's heap is on this path.
 *
 * Every field of a record is the policy's, but the policy's maps are writable
 * by root: the attributes are clamped here, where they are used (RT at most
 * PVSCHED_RT_PRIO_LIMIT with the original nice, nice within -20..19, any
 * other policy means no change), and a TID acts only on a registered vCPU.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <link.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pvsched_policy.h"
#include "../abi/sched_syscalls.h"
#include "actuator_loop.h"
#include "backstop_run.h"

#define NSEC 1000000000LL
#define PVSCHED_NATIVE_STACK (64 * 1024)

struct attr {
	int32_t policy, priority, nice;
};

struct vcpu {
	uint32_t tid, pid;
	struct pvsched_slot *slot;
	struct attr original, applied;
	uint32_t state, gone, errors;
	uint64_t gen;
	uint64_t counters[3];
};

struct pvsched_actuator_loop {
	pthread_mutex_t life;         /* start and stop, one caller at a time (pvsched_actuator_loop_stop) */
	pthread_mutex_t lock;         /* everything below; never held across poll() */
	pthread_t thread;
	int started, stop;
	int prio;
	int rb_fd, prog_fd, map_fd;
	int wake_fd;                  /* stop: the thread's poll() returns */
	int notify_fd;                /* the thread has put something in the gone queue */
	unsigned long *cons;          /* ring buffer: consumer position (read-write page) */
	const unsigned long *prod;    /* producer position, then the data twice (read-only) */
	const uint8_t *data;
	size_t rb_size, cons_len, prod_len;
	void *stack;
	int n;
	struct vcpu vcpus[PVSCHED_MAX_VCPUS];
	struct pvsched_actuator_gone gone[PVSCHED_ACTUATOR_GONE_QUEUE];
	int gone_head, gone_len;
	uint64_t latency[PVSCHED_ACTUATOR_LATENCY_SAMPLES];
	struct pvsched_actuator_loop_info info;
};

/* The libraries whose code the policy's RT threads run: this one, the backstop loop's, libc and the dynamic
 * loader (both libraries are linked with -z now, so no lazy binding runs on an RT thread). */
static const char *const LOCKED_CODE[] = { "libpvsched_actuator.so", "libpvsched_backstop.so", "/libc.so", "/ld-linux" };

static int lock_segments(struct dl_phdr_info *info, size_t size, void *data)
{
	uint64_t *locked = data;
	size_t page = sysconf(_SC_PAGESIZE);

	(void)size;
	for (size_t k = 0; k < sizeof(LOCKED_CODE) / sizeof(LOCKED_CODE[0]); k++) {
		if (!info->dlpi_name || !strstr(info->dlpi_name, LOCKED_CODE[k]))
			continue;
		for (int i = 0; i < info->dlpi_phnum; i++) {
			const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
			uintptr_t start, end;

			if (ph->p_type != PT_LOAD)
				continue;
			start = (info->dlpi_addr + ph->p_vaddr) & ~(page - 1);
			end = info->dlpi_addr + ph->p_vaddr + ph->p_memsz;
			if (mlock((void *)start, end - start) == 0)
				*locked += end - start;
		}
		break;
	}
	return 0;
}

/* Lock the code (and data) of LOCKED_CODE's libraries; the bytes locked. */
static uint64_t lock_code(void)
{
	uint64_t locked = 0;

	dl_iterate_phdr(lock_segments, &locked);
	return locked;
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * NSEC + ts.tv_nsec;
}

static int attr_eq(struct attr a, struct attr b)
{
	return a.policy == b.policy && a.priority == b.priority && a.nice == b.nice;
}

/* What may be applied for `want`, whatever the ring buffer held (the rule of actuator.clamp_attr). */
static struct attr clamp(struct attr want, struct attr original)
{
	if (attr_eq(want, original))
		return want;
	if (want.policy == SCHED_FIFO || want.policy == SCHED_RR) {
		int32_t p = want.priority < 1 ? 1 : want.priority;

		return (struct attr){ want.policy, p > PVSCHED_RT_PRIO_LIMIT ? PVSCHED_RT_PRIO_LIMIT : p, original.nice };
	}
	if (want.policy == SCHED_OTHER || want.policy == SCHED_BATCH || want.policy == SCHED_IDLE)
		return (struct attr){ want.policy, 0, want.nice < -20 ? -20 : want.nice > 19 ? 19 : want.nice };
	return original;
}

void pvsched_actuator_clamp(const int32_t want[3], const int32_t original[3], int32_t out[3])
{
	struct attr a = clamp((struct attr){ want[0], want[1], want[2] },
			      (struct attr){ original[0], original[1], original[2] });

	out[0] = a.policy;
	out[1] = a.priority;
	out[2] = a.nice;
}

static int set_attr(uint32_t tid, struct attr a)
{
	return pvsched_sched_setattr((int)tid, (uint32_t)a.policy, (uint32_t)a.priority, a.nice);
}

static int get_attr(uint32_t tid, struct attr *out)
{
	struct kernel_sched_attr k;
	int rc = pvsched_sched_getattr((int)tid, &k);

	if (rc == 0)
		*out = (struct attr){ (int32_t)(k.sched_policy & ~SCHED_RESET_ON_FORK), (int32_t)k.sched_priority,
				      k.sched_nice };
	return rc;
}

/* True if `tid` is a live thread of `pid` now: the kernel resolves /proc/<pid>/task/<tid> only within pid's
 * thread group, so a TID recycled for another process fails it.  pid 0: not checked (unit tests). */
static int is_thread_of(uint32_t pid, uint32_t tid)
{
	char path[64];
	struct stat st;

	if (!pid)
		return 1;
	snprintf(path, sizeof(path), "/proc/%u/task/%u", pid, tid);
	return stat(path, &st) == 0;
}

/* Publish what the host applied in the slot's host area, under the host seqcount (odd while writing).  The
 * guest may write any seq here: it wraps, never overflows. */
static void write_host_area(struct vcpu *v)
{
	struct pvsched_host_area *h = &v->slot->host;
	uint32_t seq = (__atomic_load_n(&h->seq, __ATOMIC_RELAXED) + 1) | 1;

	__atomic_store_n(&h->seq, seq, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	__atomic_store_n(&h->state, v->state, __ATOMIC_RELAXED);
	__atomic_store_n(&h->policy, v->applied.policy, __ATOMIC_RELAXED);
	__atomic_store_n(&h->rt_priority, (uint32_t)v->applied.priority, __ATOMIC_RELAXED);
	__atomic_store_n(&h->nice, v->applied.nice, __ATOMIC_RELAXED);
	__atomic_store_n(&h->boosts, v->counters[0], __ATOMIC_RELAXED);
	__atomic_store_n(&h->throttles, v->counters[1], __ATOMIC_RELAXED);
	__atomic_store_n(&h->boosted_ns, v->counters[2], __ATOMIC_RELAXED);
	__atomic_store_n(&h->seq, seq + 1, __ATOMIC_RELEASE);
}

static struct vcpu *find(struct pvsched_actuator_loop *l, uint32_t tid)
{
	for (int i = 0; i < l->n; i++)
		if (l->vcpus[i].tid == tid)
			return &l->vcpus[i];
	return NULL;
}

/* Mark `v` gone and tell Python (under l->lock). */
static void set_gone(struct pvsched_actuator_loop *l, struct vcpu *v, uint32_t why)
{
	if (v->gone)
		return;
	v->gone = why;
	if (l->gone_len == PVSCHED_ACTUATOR_GONE_QUEUE) {
		l->info.gone_dropped++;
	} else {
		l->gone[(l->gone_head + l->gone_len++) % PVSCHED_ACTUATOR_GONE_QUEUE] =
			(struct pvsched_actuator_gone){ .tid = v->tid, .why = why };
	}
	eventfd_write(l->notify_fd, 1);
}

static int still_ours(struct pvsched_actuator_loop *l, struct vcpu *v)
{
	if (is_thread_of(v->pid, v->tid))
		return 1;
	set_gone(l, v, PVSCHED_GONE_NOT_OURS);
	return 0;
}

/* One record (under l->lock). */
static void apply(struct pvsched_actuator_loop *l, const struct pvsched_event *ev)
{
	struct vcpu *v = find(l, ev->tid);
	struct attr want;
	int rc;

	l->info.events++;
	if (!v || v->gone) {
		l->info.stale++;
		return;
	}
	if (ev->kind == PVSCHED_EV_RECHECK) {
		struct pvsched_backstop_ctx ctx = { .tid = v->tid, .reason = PVSCHED_REASON_NONE,
						    .slot_uaddr = (uint64_t)(uintptr_t)v->slot };

		l->info.rechecks++;
		if (pvsched_backstop_run(l->prog_fd, &ctx) < 0)
			l->info.recheck_errors++;
		return;
	}
	if (ev->gen && ev->gen <= v->gen) {
		l->info.stale++;
		return;
	}
	if (ev->kind == PVSCHED_EV_EXITED) {
		set_gone(l, v, PVSCHED_GONE_EXITED);
		return;
	}
	if (ev->kind != PVSCHED_EV_APPLY) {
		l->info.stale++;
		return;
	}
	v->gen = ev->gen;
	if (ev->reason == PVSCHED_REASON_THROTTLE && ev->source < PVSCHED_ACTUATOR_SOURCES)
		l->info.throttles[ev->source]++;
	want = clamp((struct attr){ ev->params.policy, (int32_t)ev->params.rt_priority, ev->params.nice },
		     v->original);
	if (!attr_eq(want, v->applied)) {
		if (!still_ours(l, v)) {
			l->info.stale++;
			return;
		}
		rc = set_attr(v->tid, want);
		if (rc < 0) {
			l->info.errors++;
			l->info.last_errno = -rc;
			if (rc == -ESRCH)
				set_gone(l, v, PVSCHED_GONE_ESRCH);
			else if (v->errors++ == 0)
				eventfd_write(l->notify_fd, 1); /* Python logs a vCPU's first failure */
			return;
		}
		l->info.applied++;
		l->latency[l->info.latency_count++ % PVSCHED_ACTUATOR_LATENCY_SAMPLES] =
			(uint64_t)(now_ns() - (int64_t)ev->ts_ns);
		v->applied = want;
	}
	v->state = ev->state;
	v->counters[0] = ev->boosts;
	v->counters[1] = ev->throttles;
	v->counters[2] = ev->boosted_ns;
	write_host_area(v);
}

/* Every record the ring buffer holds, in order; each is released as soon as it is applied. */
static void consume(struct pvsched_actuator_loop *l)
{
	unsigned long cons = __atomic_load_n(l->cons, __ATOMIC_ACQUIRE);
	size_t mask = l->rb_size - 1;

	for (;;) {
		unsigned long prod = __atomic_load_n(l->prod, __ATOMIC_ACQUIRE);
		const uint32_t *hdr;
		uint32_t len;

		if (cons >= prod)
			return;
		hdr = (const uint32_t *)(l->data + (cons & mask));
		len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
		if (len & BPF_RINGBUF_BUSY_BIT)
			return; /* reserved, not yet committed */
		cons += (BPF_RINGBUF_HDR_SZ + (len & ~(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT)) + 7) & ~7UL;
		if (!(len & BPF_RINGBUF_DISCARD_BIT) && (len & ~BPF_RINGBUF_DISCARD_BIT) >= sizeof(struct pvsched_event)) {
			pthread_mutex_lock(&l->lock);
			apply(l, (const struct pvsched_event *)((const uint8_t *)hdr + BPF_RINGBUF_HDR_SZ));
			pthread_mutex_unlock(&l->lock);
		}
		__atomic_store_n(l->cons, cons, __ATOMIC_RELEASE);
	}
}

static int lookup(int map_fd, uint32_t key, struct pvsched_vcpu *val)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map_fd;
	attr.key = (__u64)(uintptr_t)&key;
	attr.value = (__u64)(uintptr_t)val;
	return syscall(__NR_bpf, BPF_MAP_LOOKUP_ELEM, &attr, sizeof(attr)) < 0 ? -errno : 0;
}

void pvsched_actuator_loop_refresh(struct pvsched_actuator_loop *l)
{
	struct pvsched_vcpu val;

	pthread_mutex_lock(&l->lock);
	l->info.refreshes++;
	for (int i = 0; i < l->n; i++) {
		struct vcpu *v = &l->vcpus[i];

		if (v->gone || lookup(l->map_fd, v->tid, &val) < 0)
			continue;
		if (val.boosts != v->counters[0] || val.throttles != v->counters[1] || val.boosted_ns != v->counters[2]) {
			v->counters[0] = val.boosts;
			v->counters[1] = val.throttles;
			v->counters[2] = val.boosted_ns;
			write_host_area(v);
		}
	}
	pthread_mutex_unlock(&l->lock);
}

static void *loop_main(void *arg)
{
	struct pvsched_actuator_loop *l = arg;
	struct sched_param sp = { .sched_priority = l->prio };
	struct pollfd fds[2] = { { .fd = l->rb_fd, .events = POLLIN }, { .fd = l->wake_fd, .events = POLLIN } };
	int64_t next_refresh = now_ns() + PVSCHED_ACTUATOR_COUNTERS_MS * 1000000LL, now;
	sigset_t all;
	uint64_t drain;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	pthread_mutex_lock(&l->lock);
	l->info.prio = l->prio > 0 && pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0 ? l->prio : 0;
	l->info.tid = gettid();
	pthread_mutex_unlock(&l->lock);
	for (;;) {
		int timeout = (int)((next_refresh - now_ns()) / 1000000) + 1;

		poll(fds, 2, timeout < 1 ? 1 : timeout);
		pthread_mutex_lock(&l->lock);
		l->info.wakeups++;
		if (l->stop) {
			pthread_mutex_unlock(&l->lock);
			break;
		}
		pthread_mutex_unlock(&l->lock);
		consume(l);
		now = now_ns();
		if (now >= next_refresh) {
			pvsched_actuator_loop_refresh(l);
			next_refresh = now + PVSCHED_ACTUATOR_COUNTERS_MS * 1000000LL;
		}
	}
	(void)!read(l->wake_fd, &drain, sizeof(drain));
	pthread_mutex_lock(&l->lock);
	l->info.running = 0;
	l->info.tid = 0;
	pthread_mutex_unlock(&l->lock);
	eventfd_write(l->notify_fd, 1); /* Python's watcher sees the loop end (it never polls for it) */
	return NULL;
}

static int map_ring(struct pvsched_actuator_loop *l)
{
	size_t page = sysconf(_SC_PAGESIZE);
	struct bpf_map_info mi;
	union bpf_attr attr;
	void *c, *p;

	memset(&mi, 0, sizeof(mi));
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = l->rb_fd;
	attr.info.info_len = sizeof(mi);
	attr.info.info = (__u64)(uintptr_t)&mi;
	if (syscall(__NR_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, sizeof(attr)) < 0)
		return -errno;
	if (mi.type != BPF_MAP_TYPE_RINGBUF || !mi.max_entries || mi.max_entries & (mi.max_entries - 1))
		return -EINVAL;
	l->rb_size = mi.max_entries;
	l->cons_len = page;
	l->prod_len = page + 2 * l->rb_size; /* the data is mapped twice: a record never wraps */
	c = mmap(NULL, l->cons_len, PROT_READ | PROT_WRITE, MAP_SHARED, l->rb_fd, 0);
	if (c == MAP_FAILED)
		return -errno;
	p = mmap(NULL, l->prod_len, PROT_READ, MAP_SHARED, l->rb_fd, page);
	if (p == MAP_FAILED) {
		int e = errno;

		munmap(c, l->cons_len);
		return -e;
	}
	l->cons = c;
	l->prod = p;
	l->data = (const uint8_t *)p + page;
	return 0;
}

struct pvsched_actuator_loop *pvsched_actuator_loop_new(int ringbuf_fd, int backstop_prog_fd, int vcpus_map_fd,
							int *err)
{
	/* One mapping for all of the loop's state, locked at start (calloc'd memory would share pages with the
	 * Python heap, which is not locked). */
	struct pvsched_actuator_loop *l = mmap(NULL, sizeof(*l), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
					       -1, 0);
	int rc;

	if (l == MAP_FAILED) {
		*err = errno;
		return NULL;
	}
	pthread_mutex_init(&l->life, NULL);
	pthread_mutex_init(&l->lock, NULL);
	l->rb_fd = ringbuf_fd;
	l->prog_fd = backstop_prog_fd;
	l->map_fd = vcpus_map_fd;
	l->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	l->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	rc = l->wake_fd < 0 || l->notify_fd < 0 ? -errno : map_ring(l);
	if (rc < 0) {
		*err = -rc;
		if (l->wake_fd >= 0)
			close(l->wake_fd);
		if (l->notify_fd >= 0)
			close(l->notify_fd);
		munmap(l, sizeof(*l));
		return NULL;
	}
	return l;
}

int pvsched_actuator_loop_add(struct pvsched_actuator_loop *l, uint32_t tid, uint32_t pid, uint64_t slot_uaddr,
			      int32_t policy, int32_t priority, int32_t nice)
{
	struct vcpu *v;

	if (!tid || !slot_uaddr || slot_uaddr % 8)
		return -EINVAL;
	pthread_mutex_lock(&l->lock);
	if (find(l, tid)) {
		pthread_mutex_unlock(&l->lock);
		return -EEXIST;
	}
	if (l->n == PVSCHED_MAX_VCPUS) {
		pthread_mutex_unlock(&l->lock);
		return -ENOSPC;
	}
	v = &l->vcpus[l->n++];
	*v = (struct vcpu){ .tid = tid, .pid = pid, .slot = (struct pvsched_slot *)(uintptr_t)slot_uaddr,
			    .original = { policy, priority, nice }, .applied = { policy, priority, nice } };
	/* The slot is guest RAM, written at every record: resident for as long as it is mapped. */
	mlock(v->slot, sizeof(*v->slot));
	write_host_area(v);
	l->info.nr_vcpus = l->n;
	pthread_mutex_unlock(&l->lock);
	return 0;
}

int pvsched_actuator_loop_remove(struct pvsched_actuator_loop *l, uint32_t tid, int restore)
{
	struct attr cur = { 0, 0, 0 };
	struct vcpu *v;
	int rc = 0;

	pthread_mutex_lock(&l->lock);
	v = find(l, tid);
	if (!v) {
		pthread_mutex_unlock(&l->lock);
		return -ENOENT;
	}
	if (restore && !v->gone && still_ours(l, v)) {
		rc = get_attr(tid, &cur);
		if (rc == 0 && !attr_eq(cur, v->original))
			rc = set_attr(tid, v->original);
		if (rc == 0) {
			v->applied = v->original;
			v->state = 0;
			write_host_area(v);
		}
	}
	*v = l->vcpus[--l->n];
	l->info.nr_vcpus = l->n;
	pthread_mutex_unlock(&l->lock);
	return rc;
}

int pvsched_actuator_loop_vcpu(struct pvsched_actuator_loop *l, uint32_t tid, struct pvsched_actuator_vcpu *out)
{
	struct vcpu *v;

	pthread_mutex_lock(&l->lock);
	v = find(l, tid);
	if (v)
		*out = (struct pvsched_actuator_vcpu){ .tid = v->tid, .state = v->state, .policy = v->applied.policy,
						       .priority = v->applied.priority, .nice = v->applied.nice,
						       .gone = v->gone, .errors = v->errors, .gen = v->gen };
	pthread_mutex_unlock(&l->lock);
	return v ? 0 : -ENOENT;
}

int pvsched_actuator_loop_gone(struct pvsched_actuator_loop *l, struct pvsched_actuator_gone *out, int max)
{
	uint64_t drain;
	int n = 0;

	(void)!read(l->notify_fd, &drain, sizeof(drain));
	pthread_mutex_lock(&l->lock);
	while (n < max && l->gone_len) {
		out[n++] = l->gone[l->gone_head];
		l->gone_head = (l->gone_head + 1) % PVSCHED_ACTUATOR_GONE_QUEUE;
		l->gone_len--;
	}
	pthread_mutex_unlock(&l->lock);
	return n;
}

int pvsched_actuator_loop_notify_fd(struct pvsched_actuator_loop *l)
{
	return l->notify_fd;
}

int pvsched_actuator_loop_latencies(struct pvsched_actuator_loop *l, uint64_t *out, int max)
{
	int n;

	pthread_mutex_lock(&l->lock);
	n = l->info.latency_count < PVSCHED_ACTUATOR_LATENCY_SAMPLES ? (int)l->info.latency_count
								     : PVSCHED_ACTUATOR_LATENCY_SAMPLES;
	if (n > max)
		n = max;
	memcpy(out, l->latency, n * sizeof(*out));
	pthread_mutex_unlock(&l->lock);
	return n;
}

int pvsched_actuator_loop_start(struct pvsched_actuator_loop *l, int prio)
{
	pthread_attr_t attr;
	uint64_t locked;
	int rc;

	pthread_mutex_lock(&l->life);
	pthread_mutex_lock(&l->lock);
	if (l->started) {
		pthread_mutex_unlock(&l->lock);
		pthread_mutex_unlock(&l->life);
		return -EALREADY;
	}
	if (!l->stack) {
		l->stack = mmap(NULL, PVSCHED_NATIVE_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (l->stack == MAP_FAILED) {
			l->stack = NULL;
			pthread_mutex_unlock(&l->lock);
			pthread_mutex_unlock(&l->life);
			return -ENOMEM;
		}
	}
	/* What the thread touches, resident and locked (CAP_IPC_LOCK; without it, counted but not fatal). */
	locked = mlock(l, sizeof(*l)) == 0 ? sizeof(*l) : 0;
	locked += mlock(l->stack, PVSCHED_NATIVE_STACK) == 0 ? PVSCHED_NATIVE_STACK : 0;
	locked += lock_code();
	l->info.locked_bytes = locked;
	l->prio = prio;
	l->stop = 0;
	l->info.running = 1;
	pthread_attr_init(&attr);
	pthread_attr_setstack(&attr, l->stack, PVSCHED_NATIVE_STACK);
	rc = pthread_create(&l->thread, &attr, loop_main, l);
	pthread_attr_destroy(&attr);
	l->started = rc == 0;
	if (rc)
		l->info.running = 0;
	pthread_mutex_unlock(&l->lock);
	pthread_mutex_unlock(&l->life);
	return -rc;
}

/* Stop and join the thread; idempotent, and safe from several threads at once.  Python's watcher stops the
 * loop when the loop ended by itself while stop() or a test may be stopping it too: `life` lets one caller
 * join and makes the others wait until it has, because a thread joined twice is undefined behaviour (glibc's
 * second pthread_join waited forever). */
void pvsched_actuator_loop_stop(struct pvsched_actuator_loop *l)
{
	pthread_mutex_lock(&l->life);
	pthread_mutex_lock(&l->lock);
	if (!l->started) {
		pthread_mutex_unlock(&l->lock);
		pthread_mutex_unlock(&l->life);
		return;
	}
	l->stop = 1;
	eventfd_write(l->wake_fd, 1);
	pthread_mutex_unlock(&l->lock);
	pthread_join(l->thread, NULL);
	pthread_mutex_lock(&l->lock);
	l->started = 0;
	pthread_mutex_unlock(&l->lock);
	pthread_mutex_unlock(&l->life);
}

void pvsched_actuator_loop_info(struct pvsched_actuator_loop *l, struct pvsched_actuator_loop_info *out)
{
	pthread_mutex_lock(&l->lock);
	*out = l->info;
	pthread_mutex_unlock(&l->lock);
}

void pvsched_actuator_loop_free(struct pvsched_actuator_loop *l)
{
	if (!l)
		return;
	pvsched_actuator_loop_stop(l);
	close(l->wake_fd);
	close(l->notify_fd);
	munmap(l->cons, l->cons_len);
	munmap((void *)l->prod, l->prod_len);
	if (l->stack)
		munmap(l->stack, PVSCHED_NATIVE_STACK);
	pthread_mutex_destroy(&l->lock);
	pthread_mutex_destroy(&l->life);
	munmap(l, sizeof(*l));
}
