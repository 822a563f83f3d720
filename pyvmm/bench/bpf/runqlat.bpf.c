// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Wake-to-run latency of the threads whose TIDs userspace puts in `tids`:
 * from sched_wakeup (or an involuntary switch-out) of a tracked thread until
 * sched_switch runs it again.  Same idea as libbpf-tools' runqlat, with
 * 1-us buckets so the benchmark can read p99 of the vCPU threads directly.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "runqlat.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RUNQLAT_MAX_TIDS);
	__type(key, __u32);
	__type(value, __u8);
} tids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RUNQLAT_MAX_TIDS);
	__type(key, __u32);
	__type(value, struct runqlat_start);
} start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RUNQLAT_NR_KINDS);
	__type(key, __u32);
	__type(value, struct runqlat_hist);
} hists SEC(".maps");

static __always_inline int mark(__u32 tid, __u32 kind)
{
	struct runqlat_start s = {};

	if (!bpf_map_lookup_elem(&tids, &tid))
		return 0;
	s.ts_ns = bpf_ktime_get_ns();
	s.kind = kind;
	bpf_map_update_elem(&start, &tid, &s, BPF_ANY);
	return 0;
}

/* Log-linear bucket of a wait (see runqlat.h); userspace inverts it. */
static __always_inline __u64 bucket_of(__u64 delta_ns)
{
	__u64 us = delta_ns / 1000, v;
	__u32 e = 0, i;

	if (us < RUNQLAT_LINEAR_US)
		return us;
	/* e = floor(log2(us)), a bounded loop for the verifier */
	v = us;
	for (i = 0; i < 63; i++) {
		if (v <= 1)
			break;
		v >>= 1;
		e++;
	}
	if (e > RUNQLAT_MAX_EXP)
		return RUNQLAT_NR_BUCKETS - 1;
	return RUNQLAT_LINEAR_US + (__u64)(e - RUNQLAT_LINEAR_BITS) * RUNQLAT_SUBS +
	       ((us >> (e - RUNQLAT_SUB_BITS)) & (RUNQLAT_SUBS - 1));
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(on_wakeup, struct task_struct *p)
{
	return mark(p->pid, RUNQLAT_WAKEUP);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(on_wakeup_new, struct task_struct *p)
{
	return mark(p->pid, RUNQLAT_WAKEUP);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(on_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	struct runqlat_start *s;
	struct runqlat_hist *h;
	__u32 tid = next->pid;
	__u64 delta, b;
	__u32 kind;

	/* still runnable when switched out: it waits on the runqueue from now */
	if (prev->__state == 0)
		mark(prev->pid, RUNQLAT_PREEMPT);

	s = bpf_map_lookup_elem(&start, &tid);
	if (!s)
		return 0;
	delta = bpf_ktime_get_ns() - s->ts_ns;
	kind = s->kind < RUNQLAT_NR_KINDS ? s->kind : RUNQLAT_WAKEUP;
	bpf_map_delete_elem(&start, &tid);

	h = bpf_map_lookup_elem(&hists, &kind);
	if (!h)
		return 0;
	b = bucket_of(delta);
	/* 64-bit index, checked in the same register the access uses (verifier) */
	barrier_var(b);
	if (b >= RUNQLAT_NR_BUCKETS)
		b = RUNQLAT_NR_BUCKETS - 1;
	h->count++;
	h->sum_ns += delta;
	if (delta > h->max_ns)
		h->max_ns = delta;
	h->buckets[b]++;
	return 0;
}
