// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * pvsched host policy: turns what a guest writes in its vCPU slots into host
 * scheduling parameters for the vCPU threads (pyvmm/policy/README.md,
 * "Decisions").  The programs only decide; they post each change to a ring
 * buffer and the policy process applies it with sched_setattr.
 *
 * One decision function, pvsched_eval(), serves every event: the sched and
 * KVM tracepoints (slot read with bpf_probe_read_user in the vCPU thread's
 * own context), the throttle clock (a BPF timer every clock_ms that throttles
 * a boosted vCPU that never leaves its CPU, without waking anything in user
 * space) and the backstop, a syscall program the policy process runs every
 * backstop_ms with the slot's address in its own memfd mapping (so a vCPU
 * that never leaves the CPU still has its slot re-read).
 *
 * Hysteresis is part of the policy: a halt boost is held while the slot shows
 * IDLE; a boost is dropped only when the request stops being urgent or the
 * throttle ends it, never per event: a boost flipped per event serves the
 * guest worse than no boost at all.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "pvsched_policy.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

#define SCHED_OTHER 0
#define SCHED_FIFO 1
#define SCHED_RR 2
#define SCHED_BATCH 3
#define SCHED_IDLE 5
#define TASK_RUNNING 0
#define EFAULT 14
#define EAGAIN 11
#define EBUSY 16
#define CLOCK_MONOTONIC 1

/*
 * One set of programs per host, whatever the number of VMs: every map a VM
 * owns is an inner map of a host-wide ARRAY_OF_MAPS, at its VM's slot
 * (vm_slot: VMM tgid -> slot).
 * No program names the per-VM maps below (vcpus ... clock): each VM's policy
 * process loads this object's maps (and, if it is the first on the host, its
 * programs), and its instances of them become its VM's maps, which it puts
 * into the host's outer maps while it is still privileged.  It keeps fds of
 * its own maps only (pyvmm/policy/host_programs.py), so whatever a policy
 * process writes, it writes to its own VM's maps: the path that writes is
 * where each VM's state is kept apart.
 */
struct vcpus_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PVSCHED_MAX_VCPUS);
	__type(key, __u32);			/* vCPU thread TID */
	__type(value, struct pvsched_vcpu);
} vcpus SEC(".maps");

struct tunables_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pvsched_tunables);
} tunables SEC(".maps");

struct stats_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pvsched_stats);
} stats SEC(".maps");

/* APIC id (== vCPU id under pyvmm) -> TID, for kvm_apic_accept_irq. */
struct apic_tid_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PVSCHED_MAX_VCPUS);
	__type(key, __u32);
	__type(value, __u32);
} apic_tid SEC(".maps");

struct events_map {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, PVSCHED_RINGBUF_BYTES);
} events SEC(".maps");

/* Only the programs write the VM's budget (BPF_F_RDONLY: every user-space fd of it is read-only). */
struct vm_budget_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_RDONLY);
	__type(key, __u32);
	__type(value, struct pvsched_vm_budget);
} vm_budget SEC(".maps");

/*
 * The throttle clock's timer.  Not pinned: the kernel cancels a map's timers
 * when its last user-space reference goes, so it stops with the policy
 * process even though the outer map still holds the map.  BPF_F_RDONLY: the
 * clock names its VM (vmm_tgid, set by pvs_clock_start from the caller's
 * registration), and the policy process must not rename it.
 */
struct pvsched_clock {
	struct bpf_timer timer;
	__u64 due_ns;     /* when the next tick is due: a later one is counted as late */
	__u32 vmm_tgid;   /* the VM whose vCPUs the tick looks at */
	__u32 pad;
};

struct clock_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_RDONLY);
	__type(key, __u32);
	__type(value, struct pvsched_clock);
};

/*
 * clock_map again, as its own type with a const value: clang's BTF reaches
 * clock_map only through the outer map's pointer and would emit the timer's
 * struct as a forward declaration, which libbpf cannot size.  This definition
 * makes clang emit it in full; the kernel compares the two by their fields.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_RDONLY);
	__type(key, __u32);
	__type(value, const struct pvsched_clock);
} clock SEC(".maps");

/*
 * The host's outer maps: a VM's slot -> that VM's map of each kind.  Arrays,
 * not hashes keyed by the tgid: a vCPU event finds its VM's four maps by one
 * hash lookup (vm_slot) and four array reads, not four hash lookups.
 */
#define VM_OUTER(name, inner)                                   \
	struct {                                                \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);       \
		__uint(max_entries, PVSCHED_MAX_VMS);           \
		__type(key, __u32);                             \
		__array(values, struct inner);                  \
	} name SEC(".maps")

VM_OUTER(vm_vcpus, vcpus_map);
VM_OUTER(vm_tunables, tunables_map);
VM_OUTER(vm_stats, stats_map);
VM_OUTER(vm_apic_tid, apic_tid_map);
VM_OUTER(vm_events, events_map);
VM_OUTER(vm_budgets, vm_budget_map);
VM_OUTER(vm_clock, clock_map);

/*
 * One bit per tgid, set for every registered VMM: the host's fast path.  Every
 * context switch on the host asks whether its tasks belong to a VM; an array
 * lookup is inlined by the verifier into an address computation, where a hash
 * lookup of the tgid would cost a hash and a bucket walk per task.  Written,
 * like the outer maps, only by trusted code under the host's lock.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PVSCHED_TGID_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} vmm_bits SEC(".maps");

/* VMM tgid -> its VM's slot in the outer maps (PVSCHED_MAX_VMS of them); trusted writers only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PVSCHED_MAX_VMS);
	__type(key, __u32);
	__type(value, __u32);
} vm_slot SEC(".maps");

/*
 * Policy process tgid -> its VMM's tgid: whom a syscall program (backstop,
 * clock start) run by a policy process works for.  Written only while that
 * process is privileged, before its sandbox; it holds no fd of this map after.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, PVSCHED_MAX_VMS);
	__type(key, __u32);
	__type(value, __u32);
} policy_vm SEC(".maps");

/* IDs of the host's programs and links, so that later VMs' policy processes can share them. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, PVSCHED_MAX_PROGS);
	__type(key, __u32);
	__type(value, struct pvsched_prog_ids);
} host_ids SEC(".maps");

/* One per host: the loader puts the pinned map here (bpf_map__reuse_fd) before load. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pvsched_host_budget);
} host_budget SEC(".maps");

/*
 * The VM an event belongs to, resolved once per event from its VMM's tgid:
 * its vCPUs, this CPU's counters, its tunables and its budget; the ring
 * buffer and the APIC map are looked up where used.
 */
struct vm {
	void *vcpus;
	struct pvsched_stats *stats;        /* this CPU's counts */
	struct pvsched_tunables *t;         /* these two: NULL until vm_policy() */
	struct pvsched_vm_budget *budget;
	__u32 tgid;
	__u32 slot;                         /* its index in the outer maps */
};

static __always_inline void stat_inc(const struct vm *vm, __u32 idx)
{
	if (idx < PVSCHED_STAT_NR)
		vm->stats->count[idx]++;
}

/* Whether `tgid` is a registered VMM's: one inlined array read, whatever the number of VMs. */
static __always_inline bool is_vmm(__u32 tgid)
{
	__u32 word = tgid / 64;
	__u64 *w = bpf_map_lookup_elem(&vmm_bits, &word);

	return w && ((*w >> (tgid % 64)) & 1);
}

/*
 * Fill what every event of VMM `tgid` needs (its vCPUs and this CPU's counters):
 * false when no VM of that tgid is registered (every other task).  The tunables
 * and the budget stay NULL until vm_policy(): most events of a vCPU thread (a
 * switch-in, the wake-up and the interrupt of a vCPU that is already boosted)
 * only count, so they skip those four lookups.
 */
static __always_inline bool vm_find(__u32 tgid, struct vm *vm)
{
	__u32 zero = 0, *slot;
	void *m;

	if (!is_vmm(tgid))
		return false;
	slot = bpf_map_lookup_elem(&vm_slot, &tgid);
	if (!slot)
		return false;
	vm->slot = *slot;
	vm->tgid = tgid;
	vm->t = NULL;
	vm->budget = NULL;
	vm->vcpus = bpf_map_lookup_elem(&vm_vcpus, &vm->slot);
	if (!vm->vcpus)
		return false;
	m = bpf_map_lookup_elem(&vm_stats, &vm->slot);
	if (!m)
		return false;
	vm->stats = bpf_map_lookup_elem(m, &zero);
	return vm->stats != NULL;
}

/* Add what an evaluation needs to a vm_find()'s `vm`: its tunables and its budget. */
static __always_inline bool vm_policy(struct vm *vm)
{
	__u32 zero = 0;
	void *m;

	m = bpf_map_lookup_elem(&vm_tunables, &vm->slot);
	if (!m)
		return false;
	vm->t = bpf_map_lookup_elem(m, &zero);
	m = bpf_map_lookup_elem(&vm_budgets, &vm->slot);
	if (!vm->t || !m)
		return false;
	vm->budget = bpf_map_lookup_elem(m, &zero);
	return vm->budget != NULL;
}

/* Fill `vm` whole for VMM `tgid`: false when no VM of that tgid is registered. */
static __always_inline bool vm_of(__u32 tgid, struct vm *vm)
{
	return vm_find(tgid, vm) && vm_policy(vm);
}

/* The VM a policy process (the caller of a syscall program) serves. */
static __always_inline bool vm_of_caller(struct vm *vm)
{
	__u32 caller = bpf_get_current_pid_tgid() >> 32;
	__u32 *tgid = bpf_map_lookup_elem(&policy_vm, &caller);

	return tgid && vm_of(*tgid, vm);
}

static __always_inline bool is_rt(__s32 policy)
{
	return policy == SCHED_FIFO || policy == SCHED_RR;
}

/* Ordering of parameters by how much CPU they win: higher is stronger. */
static __always_inline int rank(const struct pvsched_sched_params *p)
{
	if (is_rt(p->policy))
		return 100 + (int)p->rt_priority;
	if (p->policy == SCHED_IDLE)
		return 0;
	return 20 - p->nice;
}

static __always_inline bool same_params(const struct pvsched_sched_params *a,
					const struct pvsched_sched_params *b)
{
	return a->policy == b->policy && a->rt_priority == b->rt_priority && a->nice == b->nice;
}

/*
 * Read and validate a slot's guest area under its seqcount: retried a bounded
 * number of times when odd or changed, then ignored.  `sleepable` picks
 * bpf_copy_from_user (backstop, may fault in) over bpf_probe_read_user.
 */
static __always_inline int read_slot(const struct vm *vm, __u64 addr, struct pvsched_slot_snap *out, bool sleepable)
{
	/* the guest area's first 24 bytes: seq, flags, policy, rt_priority, nice, wake_hint */
	struct pvsched_slot_snap g = {};
	__u32 seq2 = 0;
	int i, err;

	for (i = 0; i < PVSCHED_SLOT_READ_TRIES; i++) {
		if (sleepable)
			err = bpf_copy_from_user(&g, sizeof(g), (void *)addr);
		else
			err = bpf_probe_read_user(&g, sizeof(g), (void *)addr);
		if (err)
			return -EFAULT;
		if (g.seq & 1)
			continue;
		if (sleepable)
			err = bpf_copy_from_user(&seq2, sizeof(seq2), (void *)addr);
		else
			err = bpf_probe_read_user(&seq2, sizeof(seq2), (void *)addr);
		if (err)
			return -EFAULT;
		if (seq2 != g.seq)
			continue;
		if (i)
			stat_inc(vm, PVSCHED_STAT_SLOT_RETRY);
		/* hostile input: validate and clamp every field */
		out->seq = g.seq;
		out->flags = g.flags & PVSCHED_FLAGS_ALL;
		out->wake_hint = g.wake_hint;
		out->policy = g.policy;
		out->rt_priority = 0;
		out->nice = g.nice < -20 ? -20 : (g.nice > 19 ? 19 : g.nice);
		if (is_rt(g.policy))
			out->rt_priority = g.rt_priority < 1 ? 1 : (g.rt_priority > 99 ? 99 : g.rt_priority);
		else if (g.policy != SCHED_BATCH && g.policy != SCHED_IDLE)
			out->policy = SCHED_OTHER; /* DEADLINE, EXT, unknown: OTHER, never boosted */
		return 0;
	}
	stat_inc(vm, PVSCHED_STAT_SLOT_TORN);
	return -EAGAIN;
}

/*
 * Cap what is about to be posted by the admin's limits, and clamp again here, where it is used:
 * the VM's policy process writes the tunables map, and the guest's input reaches that process.
 * So whatever the map holds, only OTHER/BATCH/IDLE (nice -20..19) or RR/FIFO at
 * 1..PVSCHED_RT_PRIO_LIMIT leave here.
 * RT keeps the original nice so restoring is exact.
 */
static __always_inline void cap(const struct pvsched_tunables *t, const struct pvsched_vcpu *v,
				struct pvsched_sched_params *p)
{
	__u32 lim = t->max_rt_prio < PVSCHED_RT_PRIO_LIMIT ? t->max_rt_prio : PVSCHED_RT_PRIO_LIMIT;

	if (!is_rt(p->policy)) {
		if (p->policy != SCHED_OTHER && p->policy != SCHED_BATCH && p->policy != SCHED_IDLE) {
			*p = v->orig; /* a map's unknown boost_policy: no change */
			return;
		}
		p->rt_priority = 0;
		if (p->nice < -20)
			p->nice = -20;
		if (p->nice > 19)
			p->nice = 19;
		return;
	}
	if (p->rt_priority > lim)
		p->rt_priority = lim;
	if (p->rt_priority < 1)
		p->rt_priority = 1;
	if (p->policy == SCHED_FIFO && !t->allow_fifo)
		p->policy = SCHED_RR;
	p->nice = v->orig.nice;
}

static __always_inline void boost_params(const struct pvsched_tunables *t, const struct pvsched_vcpu *v,
					 struct pvsched_sched_params *p)
{
	p->policy = t->boost_policy;
	p->rt_priority = t->boost_prio;
	p->nice = v->orig.nice;
	p->pad = 0;
}

/*
 * What the slot asks for: urgent -> boost; FIFO/RR -> 1:1; else its class at
 * the clamped nice.  `critical` is false when the slot's critical flags no
 * longer ask for anything (section_over()).
 */
static __always_inline __u32 wanted_from_slot(const struct pvsched_tunables *t, const struct pvsched_vcpu *v,
					      const struct pvsched_slot_snap *s, struct pvsched_sched_params *p,
					      bool critical)
{
	p->pad = 0;
	if ((critical && (s->flags & PVSCHED_FLAGS_CRITICAL)) || s->wake_hint) {
		boost_params(t, v, p);
		return PVSCHED_REASON_URGENT;
	}
	if (is_rt(s->policy)) {
		p->policy = s->policy;
		p->rt_priority = s->rt_priority;
		p->nice = v->orig.nice;
		return PVSCHED_REASON_RT_TASK;
	}
	p->nice = s->nice < t->min_nice ? t->min_nice : s->nice;
	p->policy = s->policy;
	p->rt_priority = 0;
	if (p->policy == SCHED_OTHER && p->nice == 0)
		*p = v->orig; /* plain work: the thread's own attributes */
	return PVSCHED_REASON_NORMAL;
}

/*
 * The VM's budget: one window for all vCPUs, aligned to multiples of
 * throttle_window_ns so that every CPU agrees which window it is.  Per-vCPU
 * budgets alone let V vCPUs take V times one vCPU's share (all CPUs once
 * V >= 4 per CPU at the defaults).  The first CPU to see a new window resets
 * the count (cmpxchg on the window); an add racing with that reset may be
 * lost, which under-counts by one accounting interval at most.
 */
static __always_inline void roll_window(__u64 *window, __u64 *boosted_ns, __u64 idx)
{
	__u64 old = *window;

	if (old != idx && __sync_val_compare_and_swap(window, old, idx) == old)
		*boosted_ns = 0;
}

static __always_inline struct pvsched_vm_budget *vm_window(const struct vm *vm, __u64 now)
{
	const struct pvsched_tunables *t = vm->t;
	struct pvsched_vm_budget *b = vm->budget;

	if (t->throttle_window_ns)
		roll_window(&b->window, &b->boosted_ns, now / t->throttle_window_ns);
	return b;
}

static __always_inline bool vm_over_budget(const struct vm *vm, __u64 now)
{
	struct pvsched_vm_budget *b = vm_window(vm, now);

	return b && b->boosted_ns >= vm->t->vm_boost_budget_ns;
}

/*
 * The host's budget: the same window scheme over every VM's boosted vCPUs,
 * in a map all VMs' programs share, with the admin's window (NULL: none).
 */
static __always_inline struct pvsched_host_budget *host_window(__u64 now)
{
	struct pvsched_host_budget *b;
	__u32 zero = 0;

	b = bpf_map_lookup_elem(&host_budget, &zero);
	if (!b || !b->window_ns)
		return NULL;
	roll_window(&b->window, &b->boosted_ns, now / b->window_ns);
	return b;
}

/* Which budget, if any, forbids boosting now: PVSCHED_REASON_VM_BUDGET, _HOST_BUDGET or _NONE. */
static __always_inline __u32 over_budget(const struct vm *vm, __u64 now)
{
	struct pvsched_host_budget *h;

	if (vm_over_budget(vm, now))
		return PVSCHED_REASON_VM_BUDGET;
	h = host_window(now);
	if (h && h->boosted_ns >= h->budget_ns)
		return PVSCHED_REASON_HOST_BUDGET;
	return PVSCHED_REASON_NONE;
}

#ifndef bpf_ksym_exists /* libbpf before 1.2 */
#define bpf_ksym_exists(sym) (!!(sym))
#endif
extern struct task_struct *bpf_task_from_pid(__s32 pid) __ksym __weak;
extern void bpf_task_release(struct task_struct *p) __ksym __weak;

/*
 * Budgets charge the CPU time the vCPU thread ran, not wall time: a boosted
 * vCPU whose host CPU the hypervisor stole for 15 ms took nothing from the
 * host's tasks meanwhile, yet wall time charged it half of a 30 ms budget,
 * enough to throttle a probe vCPU that needs 0.2 of a CPU.  The scheduler's
 * own count (se.sum_exec_runtime, on the run queue's task clock, which
 * excludes steal) is exact at every switch; in between it is brought up to
 * date at each tick only, and se.exec_start says when, on that task clock.
 * The task clock is not the wall clock, but over one run on one CPU it moves
 * with it (apart from steal and interrupt time): switch-in pairs the two
 * (run_start_clock, run_start_ns), so the wall time since the last update is
 * known to within what was stolen meanwhile.  That part is capped at
 * RUNNING_MAX_NS, a tick's period at HZ 250 (at HZ 100 the clock sees a
 * spinner up to 6 ms later), so an ongoing steal is charged at most that much.
 */
#define RUNNING_MAX_NS (4 * 1000 * 1000ULL)

/* The settled run time of task p: exact when p has just been switched out. */
static __always_inline __u64 task_runtime(const struct task_struct *p)
{
	return BPF_CORE_READ(p, se.sum_exec_runtime);
}

/*
 * Run time of running vCPU thread `tid` now: settled, plus the wall time since
 * its last update (capped; none when the switch-in was not seen); 0 when
 * unknown (the thread is gone, or the kernel lacks bpf_task_from_pid, before
 * 6.2).  A switch racing with this look can pair a new run_start_ns with an old
 * clock: the cap bounds that, and account() never charges more than wall time.
 */
static __always_inline __u64 running_runtime(const struct pvsched_vcpu *v, __u32 tid, __u64 now)
{
	struct task_struct *p;
	__u64 sum, clock, updated, since = 0;

	if (!bpf_ksym_exists(bpf_task_from_pid))
		return 0;
	p = bpf_task_from_pid(tid);
	if (!p)
		return 0;
	sum = task_runtime(p);
	clock = BPF_CORE_READ(p, se.exec_start);
	bpf_task_release(p);
	if (v->run_start_clock && clock >= v->run_start_clock) {
		updated = v->run_start_ns + (clock - v->run_start_clock);	/* the last update, on the wall clock */
		since = now > updated ? now - updated : 0;
	}
	return sum + (since < RUNNING_MAX_NS ? since : RUNNING_MAX_NS);
}

/*
 * Mark vCPU `v` (its task `p`) running from `now`: its run time and its task
 * clock now, which running_runtime() extends by the wall time since.
 */
static __always_inline void mark_running(struct pvsched_vcpu *v, const struct task_struct *p, __u64 now)
{
	v->run_start_exec_ns = task_runtime(p);
	v->run_start_clock = BPF_CORE_READ(p, se.exec_start);
	v->run_start_ns = now;
	asm volatile("" ::: "memory");
	v->running = 1;
}

/*
 * Add boosted run time up to now, to the vCPU's window, the VM's and the host's.
 * running/run_start_ns are written by sched_switch (lock-free: a task
 * switches on one CPU at a time) and by the clock for a switch-in no
 * sched_switch showed (mark_unseen_switch_in()), so a busy lock can never
 * leave a boosted vCPU unaccounted; counting starts at the latest of switch-in, last
 * checkpoint and the boost decision.  What is charged is the thread's run time
 * since then (above; `prev` is the vCPU's task when it is being switched out,
 * exact), never more than the wall time since then; wall time where the run
 * time is not known.  So what is charged never exceeds boosted_wall_ns.
 */
static __always_inline void account(const struct vm *vm, struct pvsched_vcpu *v, __u32 tid,
				    const struct task_struct *prev, __u64 now)
{
	const struct pvsched_tunables *t = vm->t;
	struct pvsched_host_budget *h;
	struct pvsched_vm_budget *b;
	__u64 from, from_exec, exec, ran;

	if (now - v->window_start_ns >= t->throttle_window_ns) {
		v->window_start_ns = now;
		v->window_boosted_ns = 0;
	}
	if (!v->running || v->state != PVSCHED_STATE_BOOSTED)
		return;
	from = v->run_start_ns;
	from_exec = v->run_start_exec_ns;
	if (v->acct_ns > from) {
		from = v->acct_ns;
		from_exec = v->acct_exec_ns;
	}
	if (v->boost_since_ns > from) {
		from = v->boost_since_ns;
		from_exec = v->boost_exec_ns;
	}
	exec = prev ? task_runtime(prev) : running_runtime(v, tid, now);
	if (now > from) {
		ran = now - from;
		v->boosted_wall_ns += ran;
		if (exec && from_exec) {
			/* an estimate above what the scheduler later settles is not charged twice */
			if (exec < from_exec)
				exec = from_exec;
			ran = exec - from_exec;
			/*
			 * Never more than the wall time since `from`: a mark taken
			 * below the true run time (an estimate, or a racing switch)
			 * would otherwise charge time from before `from`, time that
			 * was not boosted.
			 */
			if (ran > now - from)
				ran = now - from;
		}
		v->window_boosted_ns += ran;
		v->boosted_ns += ran;
		b = vm_window(vm, now);
		if (b)
			__sync_fetch_and_add(&b->boosted_ns, ran);
		h = host_window(now);
		if (h)
			__sync_fetch_and_add(&h->boosted_ns, ran);
	}
	v->acct_ns = now;
	v->acct_exec_ns = exec;
}

/*
 * One evaluation of one vCPU: its VM, the entry (its lock held), the VM's tunables, the
 * validated slot or NULL (wakeup, interrupt, clock, an unreadable slot at the
 * backstop), where the event comes from and when.
 */
struct eval_ctx {
	const struct vm *vm;
	struct pvsched_vcpu *v;
	const struct pvsched_tunables *t;
	const struct pvsched_slot_snap *s;
	__u64 now;
	__u32 tid;
	__u32 source;        /* enum pvsched_source */
	__u32 force_reason;  /* enum pvsched_reason naming a forced re-evaluation, or NONE */
};	/* callers build it with designated initializers: a field left out is 0 (no slot, REASON_NONE) */

/* Post a change to the actuator; on a full ring buffer nothing changes (retried next time). */
static __always_inline int post(const struct eval_ctx *c, const struct pvsched_sched_params *p, __u32 state,
				__u32 reason)
{
	struct pvsched_vcpu *v = c->v;
	__u64 now = c->now;
	struct pvsched_event *e;
	void *ring;

	if (same_params(p, &v->posted) && state == v->state) {
		stat_inc(c->vm, PVSCHED_STAT_UNCHANGED);
		return 0;
	}
	/*
	 * Each post costs the actuator (FIFO 40) a wake-up and a sched_setattr.  A guest flipping nice 5/6
	 * at every exit would make it work without bound, so a change that keeps the state waits for the
	 * minimum interval since the last post; the next evaluation (at the latest the backstop's) posts
	 * the latest wish.  Transitions (boost, unboost, throttle, unthrottle) are never held back.
	 */
	if (state == v->state && now - v->last_post_ns < PVSCHED_MIN_POST_INTERVAL_US * 1000ULL) {
		stat_inc(c->vm, PVSCHED_STAT_POST_LIMITED);
		return 0;
	}
	ring = bpf_map_lookup_elem(&vm_events, &c->vm->slot);
	e = ring ? bpf_ringbuf_reserve(ring, sizeof(*e), 0) : NULL;
	if (!e) {
		stat_inc(c->vm, PVSCHED_STAT_RB_DROP);
		return -1;
	}
	if (state == PVSCHED_STATE_BOOSTED && v->state != PVSCHED_STATE_BOOSTED) {
		v->boosts++;
		stat_inc(c->vm, PVSCHED_STAT_BOOST);
	} else if (state == PVSCHED_STATE_NORMAL && v->state == PVSCHED_STATE_BOOSTED) {
		stat_inc(c->vm, PVSCHED_STAT_UNBOOST);
	}
	v->posted = *p;
	v->state = state;
	v->reason = reason;
	v->last_post_ns = now;
	v->gen++;
	/* boosted run time is counted from the decision on */
	if (state == PVSCHED_STATE_BOOSTED) {
		v->boost_since_ns = now;
		v->boost_exec_ns = v->running ? running_runtime(v, c->tid, now) : 0;
	}

	e->ts_ns = now;
	e->gen = v->gen;
	e->kind = PVSCHED_EV_APPLY;
	e->tid = c->tid;
	e->vm_id = v->vm_id;
	e->vcpu_id = v->vcpu_id;
	e->state = state;
	e->reason = reason;
	e->source = c->source;
	e->pad = 0;
	e->params = *p;
	e->boosts = v->boosts;
	e->throttles = v->throttles;
	e->boosted_ns = v->boosted_ns;
	bpf_ringbuf_submit(e, 0);
	stat_inc(c->vm, PVSCHED_STAT_POSTED);
	if (c->t->debug >= 1)
		bpf_printk("pvsched: tid %u state %u policy %d prio %u reason %u src %u", c->tid, state,
			   p->policy, p->rt_priority, reason, c->source);
	return 1;
}

/*
 * Whether a halt wants the halt boost.  Boosting every halt
 * (boost_on_halt=always) costs the host as much as static RT for a
 * vCPU that halts often while it runs only normal-priority work, so a guest
 * that reports its sleeping RT tasks (F_RT_WAITER) gets it only when one
 * sleeps; a guest without the feature gets it at every halt.
 */
static __always_inline bool halt_boost_wanted(const struct pvsched_tunables *t, const struct pvsched_vcpu *v,
					      const struct pvsched_slot_snap *s)
{
	if (t->boost_on_halt == PVSCHED_HALT_BOOST_ALWAYS)
		return true;
	if (t->boost_on_halt != PVSCHED_HALT_BOOST_AUTO)
		return false;
	if (!(v->features & PVSCHED_F_RT_WAITER))
		return true;
	return s && (s->flags & PVSCHED_FLAG_RT_WAITING);
}

/* Boost now and hold it while the slot shows IDLE (a halt, or the interrupt that ends one). */
static __always_inline __u32 hold_boost(const struct eval_ctx *c, struct pvsched_sched_params *want, __u32 reason)
{
	boost_params(c->t, c->v, want);
	c->v->hold = 1;
	return reason;
}

/*
 * A critical-section boost is for the section the vCPU was in when it was
 * found needing one (preempted, or re-read while it waited to run): it is
 * what other vCPUs may spin behind.  A re-read of a vCPU still boosted for
 * such a section whose slot was written since (another seq) shows a vCPU
 * that ran on and left it; a section it opened since, while it ran at RT,
 * needs no boost.  Holding the boost while any critical flag shows instead
 * keeps a vCPU that enters short sections all the time boosted until the
 * throttle.  Only the periodic re-read ends it: a switch-out re-arms it.
 */
static __always_inline bool section_over(const struct eval_ctx *c)
{
	return c->t->section_boost && c->source == PVSCHED_SRC_BACKSTOP && c->v->state == PVSCHED_STATE_BOOSTED &&
	       c->v->reason == PVSCHED_REASON_URGENT && c->s->seq != c->v->urgent_seq;
}

/* The slot's own request, no halt boost: a slot that is not IDLE ends the halt. */
static __always_inline __u32 from_slot(const struct eval_ctx *c, struct pvsched_sched_params *want)
{
	__u32 reason;

	if (!(c->s->flags & PVSCHED_FLAG_IDLE))
		c->v->halted = 0;
	c->v->hold = 0;
	reason = wanted_from_slot(c->t, c->v, c->s, want, !section_over(c));
	if (reason == PVSCHED_REASON_URGENT)
		c->v->urgent_seq = c->s->seq;
	return reason;
}

/*
 * What the event asks for, before caps and budgets: the reason, with `want`
 * filled, or PVSCHED_REASON_NONE when the event decides nothing.  This is
 * the policy's one choice: another policy defines PVSCHED_CUSTOM_DECIDE,
 * includes this file and defines its own decide(); the maps, the programs,
 * the caps, the budgets and the throttle stay this file's (see rt_only.bpf.c).
 * A wake-up or an interrupt (PVSCHED_SRC_WAKEUP, _IRQ) reaches it only for a
 * halted vCPU that is not boosted (wake_evaluated()).
 */
static __always_inline __u32 decide(const struct eval_ctx *c, struct pvsched_sched_params *want);

#ifndef PVSCHED_CUSTOM_DECIDE
static __always_inline __u32 decide(const struct eval_ctx *c, struct pvsched_sched_params *want)
{
	struct pvsched_vcpu *v = c->v;
	const struct pvsched_slot_snap *s = c->s;

	switch (c->source) {
	case PVSCHED_SRC_HALT:
		v->halted = 1;
		v->halt_boost = halt_boost_wanted(c->t, v, s);
		if (v->halt_boost)
			return hold_boost(c, want, PVSCHED_REASON_HALT);
		return s ? from_slot(c, want) : PVSCHED_REASON_NONE;
	case PVSCHED_SRC_WAKEUP:
	case PVSCHED_SRC_IRQ:
		/* interrupt injection: only a halted vCPU, boost unless throttled (usually already is) */
		if (!v->halted || !v->halt_boost || v->state == PVSCHED_STATE_BOOSTED)
			return PVSCHED_REASON_NONE;
		return hold_boost(c, want, PVSCHED_REASON_IRQ);
	default:
		if (!s)
			return PVSCHED_REASON_NONE;
		if ((s->flags & PVSCHED_FLAG_IDLE) &&
		    (v->hold || (halt_boost_wanted(c->t, v, s) && v->state == PVSCHED_STATE_BOOSTED))) {
			/*
			 * Hysteresis: the halt boost is held while the slot shows
			 * IDLE (re-posted only if new tunables changed it), also
			 * for a boosted vCPU preempted or checked after it published
			 * IDLE but before its halt: dropping the boost before the
			 * halt leaves the vCPU behind host load until it halts.
			 */
			stat_inc(c->vm, PVSCHED_STAT_HOLD);
			return hold_boost(c, want, PVSCHED_REASON_HALT);
		}
		return from_slot(c, want);
	}
}
#endif /* PVSCHED_CUSTOM_DECIDE */

/*
 * The state machine (pyvmm/policy/README.md, "Decisions"), for every event.  Called with
 * c->v's lock held.
 */
static __always_inline int pvsched_eval(const struct eval_ctx *c)
{
	struct pvsched_vcpu *v = c->v;
	const struct pvsched_tunables *t = c->t;
	__u32 force_reason = c->force_reason;
	struct pvsched_sched_params want;
	__u32 reason, state, budget;

	v->last_eval_ns = c->now;
	if (c->s) {
		v->last_slot = *c->s;
		v->slot_read_ns = c->now;
	}
	account(c->vm, v, c->tid, NULL, c->now);

	if (v->state == PVSCHED_STATE_THROTTLED) {
		if (c->now < v->throttle_until_ns) {
			stat_inc(c->vm, PVSCHED_STAT_THROTTLED_IGNORED);
			return 0;
		}
		/*
		 * Throttle over: a fresh window, then evaluate as usual; v->state
		 * stays THROTTLED until post() so the change reaches the host area.
		 */
		v->window_start_ns = c->now;
		v->window_boosted_ns = 0;
		v->hold = 0;
		stat_inc(c->vm, PVSCHED_STAT_UNTHROTTLE);
		force_reason = PVSCHED_REASON_UNTHROTTLE;
		if (!c->s) {
			want = v->orig;
			return post(c, &want, PVSCHED_STATE_NORMAL, force_reason);
		}
	}

	if (v->state == PVSCHED_STATE_BOOSTED) {
		__u32 why = v->window_boosted_ns > t->max_boost_runtime_ns ? PVSCHED_REASON_THROTTLE
									 : over_budget(c->vm, c->now);

		if (why != PVSCHED_REASON_NONE) {
			want = v->orig;
			v->hold = 0;
			v->throttle_until_ns = c->now + t->throttle_ns;
			v->throttles++;
			stat_inc(c->vm, why == PVSCHED_REASON_THROTTLE ? PVSCHED_STAT_THROTTLE
				 : why == PVSCHED_REASON_VM_BUDGET ? PVSCHED_STAT_VM_BUDGET : PVSCHED_STAT_HOST_BUDGET);
			/* a halt does not reset the count: only the window or the throttle's end does */
			return post(c, &want, PVSCHED_STATE_THROTTLED, why);
		}
	}

	reason = decide(c, &want);
	if (reason == PVSCHED_REASON_NONE)
		return 0;
	cap(t, v, &want);
	/* an admin's RT thread is never pulled below its own attributes by a boost or a request */
	if (is_rt(v->orig.policy) && rank(&want) < rank(&v->orig))
		want = v->orig;
	state = rank(&want) > rank(&v->orig) ? PVSCHED_STATE_BOOSTED : PVSCHED_STATE_NORMAL;
	/* no new boost while the VM's vCPUs, or all VMs', are over their share of this window */
	if (state == PVSCHED_STATE_BOOSTED && v->state != PVSCHED_STATE_BOOSTED &&
	    (budget = over_budget(c->vm, c->now)) != PVSCHED_REASON_NONE) {
		want = v->orig;
		v->hold = 0;
		state = PVSCHED_STATE_NORMAL;
		reason = budget;
		stat_inc(c->vm, budget == PVSCHED_REASON_VM_BUDGET ? PVSCHED_STAT_VM_BUDGET : PVSCHED_STAT_HOST_BUDGET);
	}
	/* a forced re-evaluation (unthrottle, new tunables) names itself when params stay */
	if (force_reason != PVSCHED_REASON_NONE && same_params(&want, &v->posted))
		reason = force_reason;
	return post(c, &want, state, reason);
}

static __always_inline bool vcpu_trylock(const struct vm *vm, struct pvsched_vcpu *v)
{
	if (__sync_val_compare_and_swap(&v->lock, 0, 1) != 0) {
		stat_inc(vm, PVSCHED_STAT_LOCK_BUSY);
		return false;
	}
	return true;
}

static __always_inline void vcpu_unlock(struct pvsched_vcpu *v)
{
	/* release: the entry's stores stay before this one (compiler barrier; x86 is TSO) */
	asm volatile("" ::: "memory");
	*(volatile __u32 *)&v->lock = 0;
}

/* vCPU switched out: VMEXIT-like evaluation, or HALT when it blocks with an IDLE slot. */
static __always_inline void switch_out(const struct vm *vm, struct pvsched_vcpu *v, __u32 tid,
				       const struct task_struct *prev, bool runnable, __u64 now)
{
	struct pvsched_slot_snap snap = {};
	int err = read_slot(vm, v->slot_hva, &snap, false);
	__u32 src;

	account(vm, v, tid, prev, now);
	v->running = 0;
	if (err) {
		if (err == -EFAULT)
			stat_inc(vm, PVSCHED_STAT_SLOT_FAULT);
		return;
	}
	if (runnable) {
		src = PVSCHED_SRC_PREEMPT;
		stat_inc(vm, PVSCHED_STAT_PREEMPT);
	} else if (snap.flags & PVSCHED_FLAG_IDLE) {
		src = PVSCHED_SRC_HALT;
		stat_inc(vm, PVSCHED_STAT_HALT);
	} else {
		src = PVSCHED_SRC_BLOCK;
		stat_inc(vm, PVSCHED_STAT_BLOCK);
	}
	if (vm->t->debug >= 2)
		bpf_printk("pvsched: out tid %u src %u flags %x policy %d", tid, src, snap.flags, snap.policy);
	pvsched_eval(&(struct eval_ctx){ .vm = vm, .v = v, .t = vm->t, .s = &snap, .now = now, .tid = tid,
					.source = src });
}

/*
 * Task p's VM (filled in `vm`) and its vCPU entry, or NULL: not a thread of
 * a registered VMM, or one the VM did not register as a vCPU.  The host's fast
 * path: a task of any other process costs one array read (is_vmm()), whatever
 * the number of VMs.
 */
static __always_inline struct pvsched_vcpu *task_vcpu(const struct task_struct *p, struct vm *vm, __u32 *tid)
{
	if (!vm_find(p->tgid, vm))
		return NULL;
	*tid = p->pid;
	return bpf_map_lookup_elem(vm->vcpus, tid);
}

/* vCPU out (VMEXIT-like, or HALT when it blocks with an IDLE slot) and vCPU in (VMENTER-like). */
SEC("tp_btf/sched_switch")
int BPF_PROG(pvs_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	bool counted = false;
	struct pvsched_vcpu *v;
	struct vm vm;
	__u64 now;
	__u32 tid;


	v = task_vcpu(prev, &vm, &tid);
	if (v) {
		now = bpf_ktime_get_ns();
		stat_inc(&vm, PVSCHED_STAT_SWITCH_VMM); /* past the fast path only: other switches pay nothing for it */
		counted = true;
		/* current == prev here: the slot HVA is in this address space */
		if ((bpf_get_current_pid_tgid() >> 32) == vm.tgid && vm_policy(&vm) && vcpu_trylock(&vm, v)) {
			switch_out(&vm, v, tid, prev, preempt || prev_state == TASK_RUNNING, now);
			vcpu_unlock(v);
		}
		v->running = 0; /* even when the lock was busy: never left "running" */
	}

	v = task_vcpu(next, &vm, &tid);
	if (v) {
		if (!counted)
			stat_inc(&vm, PVSCHED_STAT_SWITCH_VMM);
		stat_inc(&vm, PVSCHED_STAT_SWITCH_IN);
		mark_running(v, next, bpf_ktime_get_ns()); /* next's exec_start: set by the pick that chose it */
	}
	return 0;
}

/*
 * Whether a wake-up or an interrupt of vCPU `v` is evaluated: a halted vCPU's
 * that is not boosted.  What such an event can decide is the halt boost or a
 * throttle's end; a boosted vCPU's budget is checked where its run time is
 * charged (its switch-out, the clock, the backstop).  This is the path the
 * guest's interrupt waits on, at every wake-up, so it does no more.
 */
static __always_inline bool wake_evaluated(const struct pvsched_vcpu *v)
{
	return v->halted && v->state != PVSCHED_STATE_BOOSTED;
}

/* Wakeup of a halted vCPU thread: an interrupt (a timer, an IPI) is being injected. */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(pvs_wakeup, struct task_struct *p)
{
	struct pvsched_vcpu *v;
	struct vm vm;
	__u32 tid;

	/* fast path: a task of another process returns after one array read (is_vmm()) */
	v = task_vcpu(p, &vm, &tid);
	if (!v)
		return 0;
	stat_inc(&vm, PVSCHED_STAT_WAKEUP);
	if (wake_evaluated(v) && vm_policy(&vm) && vcpu_trylock(&vm, v)) {
		pvsched_eval(&(struct eval_ctx){ .vm = &vm, .v = v, .t = vm.t, .now = bpf_ktime_get_ns(), .tid = tid,
						.source = PVSCHED_SRC_WAKEUP });
		vcpu_unlock(v);
	}
	return 0;
}

/* Post a record that carries no decision (kind EXITED or RECHECK); false when the ring buffer is full. */
static __always_inline bool post_notice(const struct vm *vm, const struct pvsched_vcpu *v, __u32 tid, __u32 kind,
					__u32 source, __u64 now)
{
	void *ring = bpf_map_lookup_elem(&vm_events, &vm->slot);
	struct pvsched_event *e = ring ? bpf_ringbuf_reserve(ring, sizeof(*e), 0) : NULL;

	if (!e) {
		stat_inc(vm, PVSCHED_STAT_RB_DROP);
		return false;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = now;
	e->kind = kind;
	e->tid = tid;
	e->vm_id = v->vm_id;
	e->vcpu_id = v->vcpu_id;
	e->source = source;
	bpf_ringbuf_submit(e, 0);
	return true;
}

/* A vCPU thread that exits: tell the actuator to forget it. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(pvs_exit, struct task_struct *p)
{
	struct pvsched_vcpu *v;
	struct vm vm;
	__u32 tid;

	v = task_vcpu(p, &vm, &tid);
	if (!v)
		return 0;
	stat_inc(&vm, PVSCHED_STAT_EXITED);
	post_notice(&vm, v, tid, PVSCHED_EV_EXITED, 0, bpf_ktime_get_ns());
	return 0;
}

/* The current task's VM (filled in `vm`) and its vCPU entry if it is a registered vCPU thread, else NULL. */
static __always_inline struct pvsched_vcpu *current_vcpu(struct vm *vm, __u32 *tid)
{
	__u64 id = bpf_get_current_pid_tgid();

	if (!vm_find(id >> 32, vm))
		return NULL;
	*tid = (__u32)id;
	return bpf_map_lookup_elem(vm->vcpus, tid);
}

/* Optional KVM events: attached where this kernel has them; they never fire on PVM. */
SEC("tp_btf/kvm_exit")
int BPF_PROG(pvs_kvm_exit)
{
	struct pvsched_slot_snap snap = {};
	struct pvsched_vcpu *v;
	struct vm vm;
	__u32 tid;

	v = current_vcpu(&vm, &tid);
	if (!v)
		return 0;
	stat_inc(&vm, PVSCHED_STAT_KVM_EXIT);
	if (!vm_policy(&vm) || !vcpu_trylock(&vm, v))
		return 0;
	if (!read_slot(&vm, v->slot_hva, &snap, false))
		pvsched_eval(&(struct eval_ctx){ .vm = &vm, .v = v, .t = vm.t, .s = &snap, .now = bpf_ktime_get_ns(),
						.tid = tid, .source = PVSCHED_SRC_KVM_EXIT });
	vcpu_unlock(v);
	return 0;
}

SEC("tp_btf/kvm_entry")
int BPF_PROG(pvs_kvm_entry)
{
	struct pvsched_vcpu *v;
	struct vm vm;
	__u32 tid;

	v = current_vcpu(&vm, &tid);
	if (!v)
		return 0;
	stat_inc(&vm, PVSCHED_STAT_KVM_ENTRY);
	if (!v->running) {
		__u64 now = bpf_ktime_get_ns();

		v->run_start_clock = 0; /* the switch-in was not seen: its pairing of the clocks is unknown */
		v->run_start_exec_ns = running_runtime(v, tid, now);
		v->run_start_ns = now;
		v->running = 1;
	}
	return 0;
}

SEC("tp_btf/kvm_vcpu_wakeup")
int BPF_PROG(pvs_vcpu_wakeup)
{
	struct vm vm;
	__u32 tid;

	if (current_vcpu(&vm, &tid))
		stat_inc(&vm, PVSCHED_STAT_VCPU_WAKEUP);
	return 0;
}

SEC("tp_btf/kvm_set_irq")
int BPF_PROG(pvs_set_irq)
{
	struct vm vm;

	/* carries only a GSI: counted, never acted on */
	if (vm_find(bpf_get_current_pid_tgid() >> 32, &vm))
		stat_inc(&vm, PVSCHED_STAT_SET_IRQ);
	return 0;
}

/* An interrupt for vCPU thread `tid` of `vm` (from vm_find()): a halted vCPU is evaluated (wake_evaluated()). */
static __always_inline void irq_to(struct vm *vm, __u32 tid)
{
	struct pvsched_vcpu *v = bpf_map_lookup_elem(vm->vcpus, &tid);

	if (!v)
		return;
	stat_inc(vm, PVSCHED_STAT_IRQ);
	if (wake_evaluated(v) && vm_policy(vm) && vcpu_trylock(vm, v)) {
		pvsched_eval(&(struct eval_ctx){ .vm = vm, .v = v, .t = vm->t, .now = bpf_ktime_get_ns(), .tid = tid,
						.source = PVSCHED_SRC_IRQ });
		vcpu_unlock(v);
	}
}

/* Names an APIC id, not a VM: used only in a VMM's own context, for that VMM's vCPUs. */
SEC("tp_btf/kvm_apic_accept_irq")
int BPF_PROG(pvs_accept_irq, __u32 apicid)
{
	__u32 key = apicid, *tid;
	struct vm vm;
	void *m;

	if (!vm_find(bpf_get_current_pid_tgid() >> 32, &vm))
		return 0;
	m = bpf_map_lookup_elem(&vm_apic_tid, &vm.slot);
	tid = m ? bpf_map_lookup_elem(m, &key) : NULL;
	if (tid && *tid)
		irq_to(&vm, *tid);
	return 0;
}

SEC("tp_btf/kvm_inj_virq")
int BPF_PROG(pvs_inj_virq)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct vm vm;

	if (vm_find(id >> 32, &vm))
		irq_to(&vm, (__u32)id);
	return 0;
}

/*
 * Backstop: the policy process runs this (BPF_PROG_TEST_RUN) every
 * backstop_ms per vCPU, and once after set_tunables, so a vCPU that never
 * switches out (a FIFO spinner) is still evaluated and throttled by the same
 * code as every other event.  It acts only on the caller's own VM (policy_vm).
 */
SEC("syscall")
int pvs_backstop(struct pvsched_backstop_ctx *ctx)
{
	struct pvsched_slot_snap snap = {};
	struct pvsched_vcpu *v;
	__u32 tid = ctx->tid;
	int err, ret = 0;
	struct vm vm;

	if (!vm_of_caller(&vm))
		return -1;
	v = bpf_map_lookup_elem(vm.vcpus, &tid);
	if (!v)
		return -1;
	stat_inc(&vm, PVSCHED_STAT_BACKSTOP);
	err = read_slot(&vm, ctx->slot_uaddr, &snap, true);
	if (err == -EFAULT)
		stat_inc(&vm, PVSCHED_STAT_SLOT_FAULT);
	if (vcpu_trylock(&vm, v)) {
		__u64 now = bpf_ktime_get_ns();

		/*
		 * An unreadable slot (odd seq forever, fault) decides nothing, but the
		 * throttle still runs: else a boosted guest escapes it by never
		 * finishing a slot write.
		 */
		ret = pvsched_eval(&(struct eval_ctx){ .vm = &vm, .v = v, .t = vm.t, .s = err ? NULL : &snap, .now = now,
						      .tid = tid, .source = PVSCHED_SRC_BACKSTOP,
						      .force_reason = ctx->reason });
		vcpu_unlock(v);
	}
	return ret;
}

/*
 * A vCPU that runs on boosted, unread for a clock period, may have ended its
 * request without leaving its CPU (RT work, then plain work): ask the policy
 * process to read its slot now, so the boost ends there rather than in a
 * throttle (which would then ignore its requests for throttle_ms).  A vCPU
 * that halts between short RT bursts, the latency case, is never asked about.
 */
static __always_inline void ask_recheck(const struct vm *vm, struct pvsched_vcpu *v, __u32 tid, __u64 now)
{
	const struct pvsched_tunables *t = vm->t;

	if (v->state != PVSCHED_STATE_BOOSTED || !v->running || now - v->run_start_ns < t->clock_ns ||
	    now - v->slot_read_ns < t->clock_ns)
		return;
	if (post_notice(vm, v, tid, PVSCHED_EV_RECHECK, PVSCHED_SRC_CLOCK, now))
		stat_inc(vm, PVSCHED_STAT_RECHECK);
}

/*
 * A boosted vCPU that is on a CPU although no sched_switch switched it in.
 * Every charge of its run time, the clock's look and the throttle depend on
 * v->running, so a switch-in the programs never saw would leave a spinner
 * boosted and uncharged until its next switch.  This happens: on the
 * development VM's kernel no sched_switch fires when one task (the sandbox
 * agent's thread) leaves a CPU, and a vCPU picked next was never marked
 * (docs/benchmarks.md, "A switch-in no program saw").  Mark it running from
 * now: at most one clock period of its run time goes uncharged.  A switch-out
 * racing this look (its program runs before the task has left the CPU) can
 * leave the flag set while the vCPU is off its CPU: what is charged then still
 * follows its run time (account()), and its next switch sets the flag right.
 */
static __always_inline void mark_unseen_switch_in(const struct vm *vm, struct pvsched_vcpu *v, __u32 tid, __u64 now)
{
	struct task_struct *p;

	if (v->state != PVSCHED_STATE_BOOSTED || v->running || !bpf_ksym_exists(bpf_task_from_pid))
		return;
	p = bpf_task_from_pid(tid);
	if (!p)
		return;
	if (BPF_CORE_READ(p, on_cpu) && BPF_CORE_READ(p, __state) == TASK_RUNNING) {
		mark_running(v, p, now); /* exec_start is its last update, before now: an estimate from it runs low */
		stat_inc(vm, PVSCHED_STAT_SWITCH_UNSEEN);
	}
	bpf_task_release(p);
}

/*
 * The throttle clock.  A boosted vCPU that never switches out (a FIFO/RR
 * spinner in the guest) produces no event, so something must look at it
 * periodically.  A user-space thread polling at that rate would preempt the
 * boosted vCPUs it serves at every wake-up.  The throttle needs no slot read,
 * so a BPF timer does it in softirq context; user space wakes only when a
 * change is posted.  `vm` is the clock's VM, on the tick's stack.
 */
static long clock_vcpu(struct bpf_map *map, __u32 *tid, struct pvsched_vcpu *v, struct vm *vm)
{
	__u64 now = bpf_ktime_get_ns();

	mark_unseen_switch_in(vm, v, *tid, now);
	if (!(v->state == PVSCHED_STATE_BOOSTED && v->running) &&
	    !(v->state == PVSCHED_STATE_THROTTLED && now >= v->throttle_until_ns))
		return 0;
	stat_inc(vm, PVSCHED_STAT_CLOCK);
	if (vcpu_trylock(vm, v)) {
		pvsched_eval(&(struct eval_ctx){ .vm = vm, .v = v, .t = vm->t, .now = now, .tid = *tid,
						.source = PVSCHED_SRC_CLOCK });
		ask_recheck(vm, v, *tid, now);
		vcpu_unlock(v);
	}
	return 0;
}

/*
 * The timer's callback runs in softirq context; under softirq-heavy load the
 * kernel defers softirqs to ksoftirqd, a SCHED_OTHER thread, and the clock
 * then runs late.  The policy process's backstop (backstop_ms, at FIFO 40)
 * bounds a boost then; late ticks are counted (stat clock_late) so they show.
 * A clock whose VM is gone from the host's maps stops.
 */
static int clock_tick(void *map, __u32 *key, struct pvsched_clock *c)
{
	__u64 now = bpf_ktime_get_ns();
	struct vm vm;

	if (!vm_of(c->vmm_tgid, &vm))
		return 0;
	if (c->due_ns && now > c->due_ns + vm.t->clock_ns)
		stat_inc(&vm, PVSCHED_STAT_CLOCK_LATE);
	bpf_for_each_map_elem(vm.vcpus, clock_vcpu, &vm, 0);
	if (vm.t->clock_ns) {
		c->due_ns = bpf_ktime_get_ns() + vm.t->clock_ns;
		bpf_timer_start(&c->timer, vm.t->clock_ns, 0);
	}
	return 0;
}

/* Start (or restart, after new tunables) the caller's VM's throttle clock; the policy process runs it. */
SEC("syscall")
int pvs_clock_start(void *ctx)
{
	struct pvsched_clock *c = NULL;
	__u32 zero = 0;
	struct vm vm;
	void *m;
	long err;

	if (!vm_of_caller(&vm) || !vm.t->clock_ns)
		return -1;
	m = bpf_map_lookup_elem(&vm_clock, &vm.slot);
	if (m)
		c = bpf_map_lookup_elem(m, &zero);
	if (!c)
		return -1;
	err = bpf_timer_init(&c->timer, m, CLOCK_MONOTONIC);
	if (err && err != -EBUSY) /* already initialised: a restart */
		return err;
	err = bpf_timer_set_callback(&c->timer, clock_tick);
	if (err)
		return err;
	c->vmm_tgid = vm.tgid;
	c->due_ns = bpf_ktime_get_ns() + vm.t->clock_ns;
	return bpf_timer_start(&c->timer, vm.t->clock_ns, 0);
}
