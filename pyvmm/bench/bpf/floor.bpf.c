// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The floor of what a program on the host-wide scheduler tracepoints costs:
 * the same attach points as the policy's pvs_switch and pvs_wakeup, and no
 * work at all.  pyvmm.bench.switchcost runs it beside the policy, so the
 * policy's fast path reads as "the floor plus what its tgid check adds".
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

SEC("tp_btf/sched_switch")
int BPF_PROG(floor_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(floor_wakeup, struct task_struct *p)
{
	return 0;
}
