// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * User half of the test guest (CPL3, runs natively): the workloads of each
 * vCPU, the latency arithmetic and every JSON record (listed in README.md).  The
 * kernel is asked for privileged things only, through int3 (see entry.S).
 */
#include "arch.h"
#include "critsec.h"
#include "guest.h"
#include "stats.h"

#define LINE_MAX 4096
/* Acquisition waits kept per lock phase (16 MiB); later ones count in min/avg/max only. */
#define LOCK_MAX_SAMPLES (1u << 22)

struct phase_result {
	u32 workload;
	u64 ms;
	u64 loops;       /* busy/hog iterations */
	u64 wakes;       /* waker: remote wakeups sent */
	struct tg_lat lat; /* lock: the acquisition waits */
	struct tg_lat irq; /* deadline to the timer interrupt (min/avg/max only) */
	struct tg_lock_stats lock;
	u64 irqs, irqs_cs, irqs_nested; /* lock: what this vCPU's interrupts found (tg_cpu_share) */
};

/* The one lock every lock phase contends. */
static struct tg_spinlock the_lock;

/* Per vCPU, on its own cache lines. */
static struct vcpu_state {
	struct phase_result phase[TG_MAX_PHASES];
	volatile u32 done; /* its records are out */
} __attribute__((aligned(CACHELINE))) vstate[TG_MAX_VCPUS];

static volatile u64 heap_next __attribute__((aligned(CACHELINE)));

static inline u64 sys3(u64 nr, u64 a, u64 b, u64 c)
{
	u64 r;

	__asm__ __volatile__("int3"
			     : "=a"(r)
			     : "a"(nr), "D"(a), "S"(b), "d"(c)
			     : "memory");
	return r;
}

static void sys_set_task(s32 policy, u32 prio, s32 nice)
{
	sys3(SYS_SET_TASK, (u64)(s64)policy, prio, (u64)(s64)nice);
}

/* One SYS_SLEEP_UNTIL; its fast path saves no register: all caller-saved are clobbered. */
static inline void sys_sleep_once(u64 tsc, u64 ipi)
{
	u64 nr = SYS_SLEEP_UNTIL, a = tsc, b = ipi;

	__asm__ __volatile__("int3"
			     : "+a"(nr), "+D"(a), "+S"(b)
			     :
			     : "rcx", "rdx", "r8", "r9", "r10", "r11", "memory", "cc");
}

/* Halt until the TSC reaches `tsc` (a timer that fires early just sleeps again). */
static void sys_sleep_until(u64 tsc)
{
	do
		sys_sleep_once(tsc, 0);
	while (rdtsc() < tsc);
}

static u64 tsc_to_ns(u64 d)
{
	return d * 1000000 / tg.tsc_khz;
}

/* One line to the console, whole (the lock serializes vCPUs). */
static void emit(struct buf *b)
{
	buf_ch(b, '\n');
	console_lock();
	sys3(SYS_WRITE, (u64)b->p, b->len, 0);
	console_unlock();
}

static void emit_str(const char *s)
{
	char line[256];
	struct buf b;

	buf_init(&b, line, sizeof(line));
	buf_str(&b, s);
	emit(&b);
}

static void __attribute__((noreturn)) fail(u32 code, const char *msg)
{
	char line[256];
	struct buf b;

	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"error\",\"message\":");
	buf_jstr(&b, msg);
	buf_str(&b, ",\"exit\":");
	buf_u64(&b, code);
	buf_ch(&b, '}');
	tg.failed = 1;
	emit(&b);
	sys3(SYS_EXIT, code, 0, 0);
	for (;;)
		;
}

/* Bump allocation of RAM after the image, shared by all vCPUs. */
static void *heap_alloc(u64 bytes, u64 *got)
{
	u64 start = __atomic_fetch_add(&heap_next, (bytes + 63) & ~63ull,
				       __ATOMIC_RELAXED);

	if (start >= tg.heap_end) {
		*got = 0;
		return 0;
	}
	*got = start + bytes <= tg.heap_end ? bytes : tg.heap_end - start;
	return (void *)start;
}

static const char *policy_name(s32 p)
{
	return p == PVSCHED_POLICY_FIFO ? "fifo" : p == PVSCHED_POLICY_RR ? "rr" : "other";
}

static const char *pv_reason(s32 status)
{
	switch (status) {
	case PVSCHED_STATUS_IDLE: return "IDLE";
	case PVSCHED_STATUS_BAD_GPA: return "BAD_GPA";
	case PVSCHED_STATUS_TOO_SMALL: return "TOO_SMALL";
	case PVSCHED_STATUS_BAD_VERSION: return "BAD_VERSION";
	case PVSCHED_STATUS_BAD_FEATURE: return "BAD_FEATURE";
	case PVSCHED_STATUS_BUSY: return "BUSY";
	case PVSCHED_STATUS_AGAIN: return "AGAIN";
	}
	return "UNKNOWN";
}

/* ---- workloads ---------------------------------------------------------- */

static struct tg_lat *start_lat(struct phase_result *r, u64 n)
{
	u64 got;
	u32 *mem = heap_alloc(n * sizeof(u32), &got);

	lat_init(&r->lat, mem, (u32)(got / sizeof(u32)));
	lat_init(&r->irq, 0, 0);
	return &r->lat;
}

/* vCPUs whose workload has a wakee phase: what a waker wakes. */
static u32 wakee_targets(u32 self, u32 *t)
{
	u32 v, p, n = 0;

	for (v = 0; v < tg.nr_vcpus; v++) {
		if (v == self)
			continue;
		for (p = 0; p < tg.cfg.nr_phases[v]; p++) {
			if (tg.cfg.phases[v][p] == TG_WL_WAKEE) {
				t[n++] = v;
				break;
			}
		}
	}
	return n;
}

/*
 * The first deadline from `next` on that is still ahead of `now`; those
 * of this phase that already passed count as missed (lost ticks).
 */
static u64 skip_missed(struct phase_result *r, u64 next, u64 now, u64 period, u64 t_end)
{
	u64 k, in_phase;

	if (now < next)
		return next;
	k = (now - next) / period + 1;
	if (next <= t_end) {
		in_phase = (t_end - next) / period + 1;
		r->lat.missed += k < in_phase ? k : in_phase;
	}
	return next + k * period;
}

/*
 * cyclictest-like: wake at every deadline, record how late the task runs.
 * A waker then hands the same deadline to each wakee and wakes it (wake_hint
 * + IPI), so the wakee's latency includes the remote wakeup.  The tick
 * workload is the same loop at SCHED_OTHER with `work` TSC cycles of CPL3
 * work after each wakeup: a guest that wakes often at normal priority.
 */
static void run_probe(struct phase_result *r, u32 vcpu, u64 t_start, u64 t_end,
		      int waker, int tick)
{
	u64 period = (u64)tg.cfg.interval_us * tg.tsc_khz / 1000;
	u64 work = tick ? (u64)tg.cfg.tick_us * tg.tsc_khz / 1000 : 0;
	u64 next, now, irq;
	u32 targets[TG_MAX_VCPUS], nt = waker ? wakee_targets(vcpu, targets) : 0, i;

	start_lat(r, (t_end - t_start) / period + 2);
	if (tick)
		sys_set_task(PVSCHED_POLICY_OTHER, 0, 0);
	else
		sys_set_task(tg.cfg.probe_policy, tg.cfg.probe_prio, 0);
	/* Deadlines on a fixed grid from the phase start: a late start misses some. */
	next = skip_missed(r, t_start + period, rdtsc(), period, t_end);
	while (next <= t_end) {
		sys_sleep_until(next);
		now = rdtsc();
		lat_record(&r->lat, tsc_to_ns(now - next));
		irq = tg_irq[vcpu].tsc;
		lat_record(&r->irq, irq > next ? tsc_to_ns(irq - next) : 0);
		for (i = 0; i < nt; i++) {
			struct tg_wake_msg *m = &tg_wake[targets[i]];

			m->deadline = next;
			__atomic_store_n(&m->seq, m->seq + 1, __ATOMIC_RELEASE);
			sys3(SYS_WAKE, targets[i], 0, 0);
			r->wakes++;
		}
		while (work && rdtsc() - now < work)
			r->loops++;
		next = skip_missed(r, next + period, now, period, t_end);
	}
}

/* RT task woken by a waker on another vCPU; latency from the waker's deadline. */
static void run_wakee(struct phase_result *r, u32 vcpu, u64 t_start, u64 t_end)
{
	u64 period = (u64)tg.cfg.interval_us * tg.tsc_khz / 1000;
	struct tg_wake_msg *m = &tg_wake[vcpu];
	u64 last = __atomic_load_n(&m->seq, __ATOMIC_ACQUIRE), now;

	start_lat(r, (t_end - t_start) / period + 2);
	sys_set_task(tg.cfg.probe_policy, tg.cfg.probe_prio, 0);
	while ((now = rdtsc()) < t_end) {
		u64 s1, s2, d, irq;

		sys_sleep_once(t_end, 1);
		now = rdtsc();
		do {
			s1 = __atomic_load_n(&m->seq, __ATOMIC_ACQUIRE);
			d = m->deadline;
			s2 = __atomic_load_n(&m->seq, __ATOMIC_ACQUIRE);
		} while (s1 != s2);
		if (s1 == last)
			continue; /* the phase-end timer, or a wake already counted */
		r->lat.missed += s1 - last - 1;
		last = s1;
		lat_record(&r->lat, now > d ? tsc_to_ns(now - d) : 0);
		irq = tg_irq[vcpu].tsc;
		lat_record(&r->irq, irq > d ? tsc_to_ns(irq - d) : 0);
	}
}

/*
 * Contend the_lock with the other lock vCPUs until t_end, as guest kernel
 * code does: hold it lock_hold_us with the slot marked PREEMPT_DISABLED
 * (critsec.h), work lock_gap_us outside it, again; the kernel's timer ticks
 * every lock_tick_us meanwhile.  Only the holder is marked: in Linux
 * spin_lock() disables preemption before it spins, so its waiters are
 * marked too, but a preempted holder is what stalls everyone.  With
 * lock_busy_us below the interval, a vCPU contends only the first
 * lock_busy_us of every interval and halts the rest, as a mostly idle guest
 * whose kernel takes a lock in bursts: no tick then, the halts' timer is
 * the interrupt.
 */
static void run_lock(struct phase_result *r, u32 vcpu, u64 t_start, u64 t_end)
{
	u64 hold = (u64)tg.cfg.lock_hold_us * tg.tsc_khz / 1000;
	u64 gap = (u64)tg.cfg.lock_gap_us * tg.tsc_khz / 1000;
	u64 per = hold + gap > tg.tsc_khz / 1000 ? hold + gap : tg.tsc_khz / 1000;
	u64 n = (t_end - t_start) / per + 16;
	struct tg_cpu_share *sh = &tg_cpu[vcpu];
	u64 irqs = sh->irqs, cs = sh->irqs_cs, nested = sh->nested;

	u64 period = (u64)tg.cfg.interval_us * tg.tsc_khz / 1000;
	u64 busy = (u64)tg.cfg.lock_busy_us * tg.tsc_khz / 1000;
	u64 next = t_start;

	start_lat(r, n < LOCK_MAX_SAMPLES ? n : LOCK_MAX_SAMPLES);
	sys_set_task(PVSCHED_POLICY_OTHER, 0, 0);
	if (busy >= period)
		busy = 0; /* a burst as long as the interval: contend all the time */
	if (!busy)
		sys3(SYS_TICK, (u64)tg.cfg.lock_tick_us * tg.tsc_khz / 1000, 0, 0);
	while (rdtsc() < t_end) {
		u64 stop = busy ? next + busy : t_end;

		while (rdtsc() < stop && rdtsc() < t_end) {
			u64 wait = tg_lock_cycle(&the_lock, sh->slot, vcpu + 1, hold, &r->lock);
			u64 out = rdtsc();

			lat_record(&r->lat, tsc_to_ns(wait));
			while (rdtsc() - out < gap)
				barrier();
		}
		if (!busy)
			break;
		while (next <= rdtsc()) /* the next interval not yet begun (a late one is skipped) */
			next += period;
		if (next >= t_end)
			break;
		sys_sleep_until(next);
	}
	if (!busy)
		sys3(SYS_TICK, 0, 0, 0);
	r->irqs = sh->irqs - irqs;
	r->irqs_cs = sh->irqs_cs - cs;
	r->irqs_nested = sh->nested - nested;
}

/* A CPU-bound loop at CPL3 until t_end; `policy` is what it asks for. */
static void run_spin(struct phase_result *r, u64 t_end, s32 policy, u32 prio, s32 nice)
{
	u64 x = 1, loops = 0;

	sys_set_task(policy, prio, nice);
	while (rdtsc() < t_end) {
		u32 i;

		for (i = 0; i < 4096; i++) {
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			__asm__ __volatile__("" : "+r"(x));
		}
		loops++;
	}
	r->loops = loops;
}

/* ---- records -------------------------------------------------------------- */

static void emit_config(void)
{
	char line[LINE_MAX];
	struct buf b;
	u32 v, p;

	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"config\",\"vcpus\":");
	buf_u64(&b, tg.nr_vcpus);
	buf_str(&b, ",\"duration_ms\":");
	buf_u64(&b, tg.cfg.duration_ms);
	buf_str(&b, ",\"interval_us\":");
	buf_u64(&b, tg.cfg.interval_us);
	buf_str(&b, ",\"workload\":[");
	for (v = 0; v < tg.nr_vcpus; v++) {
		if (v)
			buf_ch(&b, ',');
		buf_ch(&b, '"');
		for (p = 0; p < tg.cfg.nr_phases[v]; p++) {
			if (p)
				buf_ch(&b, '+');
			buf_str(&b, tg_workload_name(tg.cfg.phases[v][p]));
		}
		buf_ch(&b, '"');
	}
	buf_str(&b, "],\"probe_policy\":\"");
	buf_str(&b, policy_name(tg.cfg.probe_policy));
	buf_str(&b, "\",\"probe_prio\":");
	buf_u64(&b, tg.cfg.probe_prio);
	buf_str(&b, ",\"hog_prio\":");
	buf_u64(&b, tg.cfg.hog_prio);
	buf_str(&b, ",\"busy_nice\":");
	buf_s64(&b, tg.cfg.busy_nice);
	buf_str(&b, ",\"tick_us\":");
	buf_u64(&b, tg.cfg.tick_us);
	buf_str(&b, ",\"lock_hold_us\":");
	buf_u64(&b, tg.cfg.lock_hold_us);
	buf_str(&b, ",\"lock_gap_us\":");
	buf_u64(&b, tg.cfg.lock_gap_us);
	buf_str(&b, ",\"lock_tick_us\":");
	buf_u64(&b, tg.cfg.lock_tick_us);
	buf_str(&b, ",\"lock_busy_us\":");
	buf_u64(&b, tg.cfg.lock_busy_us);
	buf_str(&b, ",\"timer\":\"");
	buf_str(&b, tg.timer_tsc_deadline ? "tsc-deadline" : "lapic-oneshot");
	buf_str(&b, "\",\"tsc_khz\":");
	buf_u64(&b, tg.tsc_khz);
	buf_str(&b, ",\"mem_mib\":");
	buf_u64(&b, tg.mem_size >> 20);
	buf_ch(&b, '}');
	emit(&b);
}

static void emit_pvsched(void)
{
	char line[LINE_MAX];
	struct buf b;

	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"pvsched\",\"status\":");
	switch (tg.pv_state) {
	case TG_PV_DISABLED:
		buf_str(&b, "\"disabled\"");
		break;
	case TG_PV_ABSENT:
		buf_str(&b, "\"absent\"");
		break;
	case TG_PV_REFUSED:
		buf_str(&b, "\"refused\",\"code\":");
		buf_s64(&b, tg.pv_status);
		buf_str(&b, ",\"reason\":\"");
		buf_str(&b, pv_reason(tg.pv_status));
		buf_ch(&b, '"');
		break;
	case TG_PV_ACTIVE:
		buf_str(&b, "\"active\"");
		break;
	}
	if (tg.pv_state == TG_PV_ACTIVE || tg.pv_state == TG_PV_REFUSED) {
		buf_str(&b, ",\"version\":");
		buf_u64(&b, tg.pv_version);
		buf_str(&b, ",\"features\":");
		buf_u64(&b, tg.pv_features);
		buf_str(&b, ",\"host_version\":");
		buf_u64(&b, tg.pv_host_version);
		buf_str(&b, ",\"host_features\":");
		buf_u64(&b, tg.pv_host_features);
		buf_str(&b, ",\"nr_vcpus\":");
		buf_u64(&b, tg.pv_host_nr_vcpus);
		buf_str(&b, ",\"bar0\":");
		buf_u64(&b, tg.pv_bar);
		buf_str(&b, ",\"shm_gpa\":");
		buf_u64(&b, tg.pv_shm_gpa);
		buf_str(&b, ",\"shm_size\":");
		buf_u64(&b, tg.pv_shm_size);
	}
	buf_ch(&b, '}');
	emit(&b);
}

static void buf_member_u64(struct buf *b, const char *key, u64 v)
{
	buf_str(b, ",\"");
	buf_str(b, key);
	buf_str(b, "\":");
	buf_u64(b, v);
}

/* A lock phase: its acquisition waits as a latency record, with its rate and its checks. */
static void emit_lock(u32 vcpu, u32 idx, struct phase_result *r)
{
	char line[LINE_MAX];
	struct tg_summary s;
	struct buf b;

	lat_summarize(&r->lat, &s);
	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"latency\",\"vcpu\":");
	buf_u64(&b, vcpu);
	buf_member_u64(&b, "phase", idx);
	buf_str(&b, ",\"workload\":\"lock\",\"policy\":\"other\",\"prio\":0");
	buf_member_u64(&b, "lock_hold_us", tg.cfg.lock_hold_us);
	buf_member_u64(&b, "lock_gap_us", tg.cfg.lock_gap_us);
	buf_member_u64(&b, "lock_tick_us", tg.cfg.lock_tick_us);
	buf_member_u64(&b, "lock_busy_us", tg.cfg.lock_busy_us);
	buf_member_u64(&b, "ms", r->ms);
	buf_member_u64(&b, "acquisitions", r->lock.acquisitions);
	buf_member_u64(&b, "acq_per_s", r->ms ? r->lock.acquisitions * 1000 / r->ms : 0);
	buf_member_u64(&b, "violations", r->lock.violations);
	buf_member_u64(&b, "flag_lost", r->lock.flag_lost);
	buf_member_u64(&b, "irqs", r->irqs);
	buf_member_u64(&b, "irqs_in_hold", r->irqs_cs);
	buf_member_u64(&b, "irqs_nested", r->irqs_nested);
	buf_ch(&b, ',');
	lat_json(&b, &r->lat, &s);
	buf_ch(&b, '}');
	emit(&b);
}

static void emit_phase(u32 vcpu, u32 idx, struct phase_result *r)
{
	char line[LINE_MAX];
	struct buf b;

	if (r->workload == TG_WL_LOCK) {
		emit_lock(vcpu, idx, r);
		return;
	}
	buf_init(&b, line, sizeof(line));
	if (r->workload == TG_WL_PROBE || r->workload == TG_WL_WAKER ||
	    r->workload == TG_WL_WAKEE || r->workload == TG_WL_TICK) {
		int tick = r->workload == TG_WL_TICK;
		struct tg_summary s;

		lat_summarize(&r->lat, &s);
		buf_str(&b, "{\"type\":\"latency\",\"vcpu\":");
		buf_u64(&b, vcpu);
		buf_str(&b, ",\"phase\":");
		buf_u64(&b, idx);
		buf_str(&b, ",\"workload\":\"");
		buf_str(&b, tg_workload_name(r->workload));
		buf_str(&b, "\",\"policy\":\"");
		buf_str(&b, policy_name(tick ? PVSCHED_POLICY_OTHER : tg.cfg.probe_policy));
		buf_str(&b, "\",\"prio\":");
		buf_u64(&b, tick ? 0 : tg.cfg.probe_prio);
		if (tick) {
			buf_str(&b, ",\"tick_us\":");
			buf_u64(&b, tg.cfg.tick_us);
		}
		buf_str(&b, ",\"interval_us\":");
		buf_u64(&b, tg.cfg.interval_us);
		buf_str(&b, ",\"ms\":");
		buf_u64(&b, r->ms);
		if (r->workload == TG_WL_WAKER) {
			buf_str(&b, ",\"wakes\":");
			buf_u64(&b, r->wakes);
		}
		buf_ch(&b, ',');
		lat_json(&b, &r->lat, &s);
		/* The part of the latency before the guest kernel ran (host + KVM). */
		buf_str(&b, ",\"irq\":{\"min\":");
		buf_us3(&b, r->irq.dropped ? r->irq.min_ns : 0);
		buf_str(&b, ",\"avg\":");
		buf_us3(&b, r->irq.dropped ? r->irq.sum_ns / r->irq.dropped : 0);
		buf_str(&b, ",\"max\":");
		buf_us3(&b, r->irq.max_ns);
		buf_ch(&b, '}');
	} else {
		buf_str(&b, "{\"type\":\"workload\",\"vcpu\":");
		buf_u64(&b, vcpu);
		buf_str(&b, ",\"phase\":");
		buf_u64(&b, idx);
		buf_str(&b, ",\"workload\":\"");
		buf_str(&b, tg_workload_name(r->workload));
		buf_str(&b, "\",\"ms\":");
		buf_u64(&b, r->ms);
		if (r->workload == TG_WL_BUSY || r->workload == TG_WL_HOG) {
			buf_str(&b, ",\"loops\":");
			buf_u64(&b, r->loops);
		}
		if (r->workload == TG_WL_HOG) {
			buf_str(&b, ",\"prio\":");
			buf_u64(&b, tg.cfg.hog_prio);
		}
		if (r->workload == TG_WL_BUSY) {
			buf_str(&b, ",\"nice\":");
			buf_s64(&b, tg.cfg.busy_nice);
		}
	}
	buf_ch(&b, '}');
	emit(&b);
}

/* What the host applied to this vCPU (HOST_FEEDBACK), read under its seqcount. */
static void emit_host_area(u32 vcpu)
{
	struct pvsched_host_area *h, copy;
	char line[512];
	struct buf b;
	int tries;

	if (tg.pv_state != TG_PV_ACTIVE || !(tg.pv_features & PVSCHED_F_HOST_FEEDBACK) ||
	    vcpu >= tg.pv_host_nr_vcpus)
		return;
	h = &((struct pvsched_slot *)((char *)tg.pv_shm + PVSCHED_SLOT_OFFSET +
				      (u64)vcpu * PVSCHED_SLOT_SIZE))->host;
	for (tries = 0; tries < 1000; tries++) {
		u32 s1 = READ_ONCE(h->seq);

		barrier();
		copy.state = READ_ONCE(h->state);
		copy.policy = READ_ONCE(h->policy);
		copy.rt_priority = READ_ONCE(h->rt_priority);
		copy.nice = READ_ONCE(h->nice);
		copy.boosts = READ_ONCE(h->boosts);
		copy.throttles = READ_ONCE(h->throttles);
		copy.boosted_ns = READ_ONCE(h->boosted_ns);
		barrier();
		if (!(s1 & 1) && READ_ONCE(h->seq) == s1)
			break;
	}
	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"host\",\"vcpu\":");
	buf_u64(&b, vcpu);
	buf_str(&b, ",\"consistent\":");
	buf_str(&b, tries < 1000 ? "true" : "false");
	buf_str(&b, ",\"state\":");
	buf_u64(&b, copy.state);
	buf_str(&b, ",\"policy\":");
	buf_s64(&b, copy.policy);
	buf_str(&b, ",\"rt_priority\":");
	buf_u64(&b, copy.rt_priority);
	buf_str(&b, ",\"nice\":");
	buf_s64(&b, copy.nice);
	buf_str(&b, ",\"boosts\":");
	buf_u64(&b, copy.boosts);
	buf_str(&b, ",\"throttles\":");
	buf_u64(&b, copy.throttles);
	buf_str(&b, ",\"boosted_us\":");
	buf_u64(&b, copy.boosted_ns / 1000);
	buf_ch(&b, '}');
	emit(&b);
}

/* ---- per vCPU ------------------------------------------------------------- */

/* vCPU 0: report the boot, wait for the others, set the common start, say go. */
static void start_all(void)
{
	const char *warn;
	u64 limit;

	heap_next = tg.heap_start;
	emit_config();
	emit_pvsched();
	warn = tg.cmdline_warning;
	if (warn[0]) {
		char line[256];
		struct buf b;

		buf_init(&b, line, sizeof(line));
		buf_str(&b, "{\"type\":\"warning\",\"message\":");
		buf_jstr(&b, warn);
		buf_ch(&b, '}');
		emit(&b);
	}
	/* Everyone online within 10 s, or the VMM lost a vCPU. */
	limit = rdtsc() + 10000 * tg.tsc_khz;
	while (READ_ONCE(tg.nr_online) + 1 < tg.nr_vcpus) {
		if (rdtsc() > limit)
			fail(TG_EXIT_VCPU_LOST, "not every vCPU came online");
		sys_sleep_until(rdtsc() + tg.tsc_khz);
	}
	/* Leave the others (polling every 1 ms) time to get going. */
	tg.start_tsc = rdtsc() + 5 * tg.tsc_khz;
	__atomic_store_n(&tg.boot_go, 1, __ATOMIC_RELEASE);
}

/* Whether every vCPU's records are out. */
static int all_done(void)
{
	u32 v;

	for (v = 0; v < tg.nr_vcpus; v++)
		if (!__atomic_load_n(&vstate[v].done, __ATOMIC_ACQUIRE))
			return 0;
	return 1;
}

static void wait_all_done(void)
{
	u64 limit = rdtsc() + 30000 * tg.tsc_khz;
	char msg[160];
	struct buf b;
	u32 v;

	while (!all_done()) {
		if (rdtsc() > limit) {
			buf_init(&b, msg, sizeof(msg));
			buf_str(&b, "vCPU");
			for (v = 0; v < tg.nr_vcpus && b.len < sizeof(msg) - 48; v++)
				if (!READ_ONCE(vstate[v].done)) {
					buf_ch(&b, ' ');
					buf_u64(&b, v);
				}
			buf_str(&b, " did not finish its workload within 30 s");
			fail(TG_EXIT_VCPU_LOST, msg);
		}
		sys_sleep_until(rdtsc() + tg.tsc_khz);
	}
}

/* One warning record: `n` wake-ups of vCPU `vcpu` that came `where`, each a lost wake-up entry.S saved. */
static void emit_wake_warning(u32 vcpu, u64 n, const char *where)
{
	char line[256];
	struct buf b;

	if (!n)
		return;
	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"warning\",\"message\":\"vCPU ");
	buf_u64(&b, vcpu);
	buf_str(&b, ": ");
	buf_u64(&b, n);
	buf_str(&b, " wake-up(s) came ");
	buf_str(&b, where);
	buf_str(&b, " (this KVM ignores STI's interrupt shadow); resumed past the hlt\"}");
	emit(&b);
}

/* What entry.S saved this vCPU from: wake-ups PVM delivered before the hlt of a sti;hlt pair ran. */
static void emit_shadow_wakes(u32 vcpu)
{
	emit_wake_warning(vcpu, tg_cpu[vcpu].shadow_wakes, "between sti and hlt");
	emit_wake_warning(vcpu, tg_cpu[vcpu].sti_wakes, "at the sti before a hlt");
}

void user_main(u32 vcpu)
{
	struct vcpu_state *st = &vstate[vcpu];
	u32 np = tg.cfg.nr_phases[vcpu], p;
	u64 total, t0;

	if (vcpu == 0)
		start_all();
	total = (u64)tg.cfg.duration_ms * tg.tsc_khz;
	t0 = tg.start_tsc;
	if (rdtsc() < t0)
		sys_sleep_until(t0);
	for (p = 0; p < np; p++) {
		struct phase_result *r = &st->phase[p];
		u64 a = t0 + total * p / np, e = t0 + total * (p + 1) / np;

		r->workload = tg.cfg.phases[vcpu][p];
		r->ms = (e - a) / tg.tsc_khz;
		switch (r->workload) {
		case TG_WL_PROBE:
		case TG_WL_WAKER:
		case TG_WL_TICK:
			run_probe(r, vcpu, a, e, r->workload == TG_WL_WAKER,
				  r->workload == TG_WL_TICK);
			break;
		case TG_WL_WAKEE:
			run_wakee(r, vcpu, a, e);
			break;
		case TG_WL_LOCK:
			run_lock(r, vcpu, a, e);
			break;
		case TG_WL_BUSY:
			run_spin(r, e, PVSCHED_POLICY_OTHER, 0, tg.cfg.busy_nice);
			break;
		case TG_WL_HOG:
			run_spin(r, e, PVSCHED_POLICY_FIFO, tg.cfg.hog_prio, 0);
			break;
		case TG_WL_IDLE:
			sys_set_task(PVSCHED_POLICY_OTHER, 0, 0);
			sys_sleep_until(e);
			break;
		}
	}
	/*
	 * Every vCPU's phases end at one deadline: vCPU 0 says so while its task
	 * is still what the last phase made it, so that a host measuring around
	 * the guest's work can stop before the report, which is ordinary work
	 * (the benchmark's window, pyvmm/bench/vmrun.py).
	 */
	if (vcpu == 0)
		emit_str("{\"type\":\"phases_end\"}");
	/* Reporting is ordinary work. */
	sys_set_task(PVSCHED_POLICY_OTHER, 0, 0);
	for (p = 0; p < np; p++)
		emit_phase(vcpu, p, &st->phase[p]);
	emit_host_area(vcpu);
	emit_shadow_wakes(vcpu);
	__atomic_store_n(&st->done, 1, __ATOMIC_RELEASE);
	if (vcpu != 0) {
		sys3(SYS_HALT, 0, 0, 0);
		for (;;)
			;
	}
	wait_all_done();
	emit_str(tg.failed ? "{\"type\":\"done\",\"status\":\"failed\"}" :
			     "{\"type\":\"done\",\"status\":\"ok\"}");
	sys3(SYS_EXIT, tg.failed ? TG_EXIT_VCPU_LOST : TG_EXIT_OK, 0, 0);
	for (;;)
		;
}
