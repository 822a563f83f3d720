// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Stand-in "VMM" for the BPF policy tests and benchmark (tests/standin/policy_bench.py): N real threads ("vCPUs") that
 * write pvsched slots in a memfd exactly as a guest would (seqcount, flags,
 * task policy) and behave like the test guest's workloads (probe: an RR task
 * that wakes every millisecond; idle: halted; busy/hog: never blocks).
 *
 * Usage: fakevmm NR_THREADS MAX_SECONDS   (always run under an RT watchdog:
 *        chrt -f 50 timeout S chrt -o 0 fakevmm ...)
 * Prints one JSON line {"pid","memfd","hva","tids":[...]} then reads
 * commands on stdin, one per line:
 *   mode I idle|probe|busy|hog|block|torn|alt|burst|wake|exit
 *        (alt: RR 5 / OTHER every 0.5 ms, blocking; burst: RR 8 runs 8 ms, halts 2 ms;
 *         wake: plain OTHER work 300 us, halts 700 us: the halt-boost cost case)
 *   custom I spin|sleep FLAGS POLICY PRIO NICE WAKE   (fixed slot contents)
 *   lat I        -> {"vcpu":I,"samples":N,"p50":us,"p99":us,"max":us}, resets
 *   quit
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;
#include "../../pyvmm/abi/pvsched_abi.h"

enum mode { M_IDLE, M_PROBE, M_BUSY, M_HOG, M_BLOCK, M_TORN, M_CUSTOM_SPIN, M_CUSTOM_SLEEP, M_EXIT, M_ALT, M_BURST, M_WAKE, M_NICEFLIP };

#define MAX_THREADS 8
#define MAX_SAMPLES 20000

struct vcpu {
	int id;
	pid_t tid;
	_Atomic int mode;
	_Atomic __u32 c_flags, c_wake;
	_Atomic int c_policy, c_prio, c_nice;
	pthread_mutex_t lat_lock;
	unsigned n;
	__u32 lat_us[MAX_SAMPLES];
	pthread_t thr;
};

static struct vcpu vcpus[MAX_THREADS];
static struct pvsched_slot *slots;

static __u64 now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (__u64)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void slot_write(struct pvsched_slot *s, __u32 flags, int policy, __u32 prio, int nice, __u32 wake)
{
	struct pvsched_guest_area *g = &s->guest;

	__atomic_store_n(&g->seq, g->seq + 1, __ATOMIC_RELEASE); /* odd */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	g->flags = flags;
	g->policy = policy;
	g->rt_priority = prio;
	g->nice = nice;
	g->wake_hint = wake;
	g->guest_ns = now_ns();
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	__atomic_store_n(&g->seq, g->seq + 1, __ATOMIC_RELEASE); /* even */
}

static void spin_us(unsigned us)
{
	__u64 end = now_ns() + us * 1000ull;

	while (now_ns() < end)
		;
}

static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	struct pvsched_slot *s = &slots[v->id];
	struct timespec next;
	int last = -1;

	v->tid = (pid_t)syscall(SYS_gettid);
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (;;) {
		int m = atomic_load(&v->mode);

		switch (m) {
		case M_EXIT:
			return NULL;
		case M_IDLE: /* halted, woken by a 1 ms timer, back to halt */
			slot_write(s, PVSCHED_FLAG_IDLE, PVSCHED_POLICY_OTHER, 0, 0, 0);
			usleep(1000);
			break;
		case M_PROBE: { /* RR 8 task: runs 50 us every 1 ms, idle in between */
			__u64 due, late;

			slot_write(s, PVSCHED_FLAG_IDLE, PVSCHED_POLICY_OTHER, 0, 0, 0);
			next.tv_nsec += 1000000;
			if (next.tv_nsec >= 1000000000) {
				next.tv_nsec -= 1000000000;
				next.tv_sec++;
			}
			due = (__u64)next.tv_sec * 1000000000ull + next.tv_nsec;
			clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
			late = now_ns() - due;
			slot_write(s, 0, PVSCHED_POLICY_RR, 8, 0, 0);
			pthread_mutex_lock(&v->lat_lock);
			if (v->n < MAX_SAMPLES)
				v->lat_us[v->n++] = (__u32)(late / 1000);
			pthread_mutex_unlock(&v->lat_lock);
			spin_us(50);
			if (now_ns() > due + 20000000ull) /* fell far behind: resync */
				clock_gettime(CLOCK_MONOTONIC, &next);
			break;
		}
		case M_BUSY: /* plain guest work: never blocks */
			if (last != m)
				slot_write(s, 0, PVSCHED_POLICY_OTHER, 0, 0, 0);
			spin_us(100);
			break;
		case M_HOG: /* guest FIFO 99 task that never yields */
			if (last != m)
				slot_write(s, 0, PVSCHED_POLICY_FIFO, 99, 0, 0);
			spin_us(100);
			break;
		case M_BLOCK: /* waits on a lock, not halted: slot not IDLE */
			slot_write(s, 0, PVSCHED_POLICY_OTHER, 0, 0, 0);
			usleep(1000);
			break;
		case M_TORN: /* a writer stuck mid-update: seq stays odd, asks RT */
			if (last != m) {
				slot_write(s, 0, PVSCHED_POLICY_FIFO, 5, 0, 0);
				__atomic_store_n(&s->guest.seq, s->guest.seq + 1, __ATOMIC_RELEASE);
			}
			usleep(1000);
			break;
		case M_ALT: /* a request that changes at every block: one decision per switch-out */
			slot_write(s, 0, PVSCHED_POLICY_RR, 5, 0, 0);
			usleep(500);
			slot_write(s, 0, PVSCHED_POLICY_OTHER, 0, 0, 0);
			usleep(500);
			break;
		case M_NICEFLIP: /* a hostile guest: nice 5 / nice 6 at every block (no state change, no throttle) */
			slot_write(s, 0, PVSCHED_POLICY_OTHER, 0, 5, 0);
			usleep(50);
			slot_write(s, 0, PVSCHED_POLICY_OTHER, 0, 6, 0);
			usleep(50);
			break;
		case M_BURST: /* an RT task that halts briefly between long runs */
			slot_write(s, 0, PVSCHED_POLICY_RR, 8, 0, 0);
			spin_us(8000);
			slot_write(s, PVSCHED_FLAG_IDLE, PVSCHED_POLICY_OTHER, 0, 0, 0);
			usleep(2000);
			break;
		case M_WAKE: /* normal-priority work that wakes often */
			slot_write(s, 0, PVSCHED_POLICY_OTHER, 0, 0, 0);
			spin_us(300);
			slot_write(s, PVSCHED_FLAG_IDLE, PVSCHED_POLICY_OTHER, 0, 0, 0);
			usleep(700);
			break;
		case M_CUSTOM_SPIN:
		case M_CUSTOM_SLEEP:
			slot_write(s, atomic_load(&v->c_flags), atomic_load(&v->c_policy), atomic_load(&v->c_prio),
				   atomic_load(&v->c_nice), atomic_load(&v->c_wake));
			if (m == M_CUSTOM_SPIN)
				spin_us(100);
			else
				usleep(1000);
			break;
		}
		last = m;
	}
}

static int parse_mode(const char *s)
{
	static const char *names[] = { "idle", "probe", "busy", "hog", "block", "torn", "", "", "exit", "alt", "burst", "wake", "niceflip" };

	for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (names[i][0] && !strcmp(s, names[i]))
			return (int)i;
	return -1;
}

static int cmp_u32(const void *a, const void *b)
{
	__u32 x = *(const __u32 *)a, y = *(const __u32 *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 1;
	int secs = argc > 2 ? atoi(argv[2]) : 30;
	size_t size = 4096;
	char line[256];
	void *base;
	int fd;

	if (n < 1 || n > MAX_THREADS) {
		fprintf(stderr, "fakevmm: 1..%d threads\n", MAX_THREADS);
		return 2;
	}
	alarm(secs); /* hard deadline even if the test dies */
	fd = memfd_create("fakevmm-ram", 0);
	if (fd < 0 || ftruncate(fd, size) < 0)
		return perror("memfd"), 1;
	base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		return perror("mmap"), 1;
	slots = (struct pvsched_slot *)((char *)base + PVSCHED_SLOT_OFFSET);
	for (int i = 0; i < n; i++) {
		vcpus[i].id = i;
		atomic_store(&vcpus[i].mode, M_BLOCK);
		pthread_mutex_init(&vcpus[i].lat_lock, NULL);
		pthread_create(&vcpus[i].thr, NULL, vcpu_main, &vcpus[i]);
	}
	for (int i = 0; i < n; i++)
		while (!__atomic_load_n(&vcpus[i].tid, __ATOMIC_ACQUIRE))
			usleep(100);
	printf("{\"pid\":%d,\"memfd\":%d,\"hva\":%lu,\"slot_offset\":%d,\"tids\":[", getpid(), fd,
	       (unsigned long)base, PVSCHED_SLOT_OFFSET);
	for (int i = 0; i < n; i++)
		printf("%s%d", i ? "," : "", vcpus[i].tid);
	printf("]}\n");
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin)) {
		char cmd[16] = "", arg[16] = "";
		int i = -1, m;
		unsigned flags = 0, wake = 0;
		int pol = 0, prio = 0, nice = 0;

		sscanf(line, "%15s %d %15s %u %d %d %d %u", cmd, &i, arg, &flags, &pol, &prio, &nice, &wake);
		if (!strcmp(cmd, "quit"))
			break;
		if (i < 0 || i >= n) {
			printf("{\"error\":\"bad vcpu\"}\n");
		} else if (!strcmp(cmd, "mode") && (m = parse_mode(arg)) >= 0) {
			atomic_store(&vcpus[i].mode, m);
			printf("{\"ok\":true}\n");
		} else if (!strcmp(cmd, "custom")) {
			atomic_store(&vcpus[i].c_flags, flags);
			atomic_store(&vcpus[i].c_policy, pol);
			atomic_store(&vcpus[i].c_prio, prio);
			atomic_store(&vcpus[i].c_nice, nice);
			atomic_store(&vcpus[i].c_wake, wake);
			atomic_store(&vcpus[i].mode, !strcmp(arg, "spin") ? M_CUSTOM_SPIN : M_CUSTOM_SLEEP);
			printf("{\"ok\":true}\n");
		} else if (!strcmp(cmd, "lat")) {
			struct vcpu *v = &vcpus[i];
			unsigned k;

			pthread_mutex_lock(&v->lat_lock);
			k = v->n;
			qsort(v->lat_us, k, sizeof(__u32), cmp_u32);
			printf("{\"vcpu\":%d,\"samples\":%u,\"p50\":%u,\"p99\":%u,\"max\":%u}\n", i, k,
			       k ? v->lat_us[k / 2] : 0, k ? v->lat_us[(k * 99) / 100] : 0, k ? v->lat_us[k - 1] : 0);
			v->n = 0;
			pthread_mutex_unlock(&v->lat_lock);
		} else {
			printf("{\"error\":\"bad command\"}\n");
		}
		fflush(stdout);
	}
	for (int i = 0; i < n; i++)
		atomic_store(&vcpus[i].mode, M_EXIT);
	for (int i = 0; i < n; i++)
		pthread_join(vcpus[i].thr, NULL);
	return 0;
}
