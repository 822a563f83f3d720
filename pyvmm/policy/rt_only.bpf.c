// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * rt_only: pvsched with one reason to boost instead of two.  A vCPU gets the
 * guest's RT task's parameters 1:1 and nothing else: no boost for critical
 * sections or a wake hint, no halt boost.  Maps, programs, caps, budgets and
 * the throttle are pvsched.bpf.c's, so the policy process, the tunables and
 * `pyvmm policy show` work unchanged.  It answers the ablation "what do the
 * critical-section and halt boosts add?":
 *
 *     pyvmm boot --policy-program rt_only
 */
#define PVSCHED_CUSTOM_DECIDE
#include "pvsched.bpf.c"

static __always_inline __u32 decide(const struct eval_ctx *c, struct pvsched_sched_params *want)
{
	const struct pvsched_slot_snap *s = c->s;

	c->v->hold = 0;
	c->v->halt_boost = 0;
	if (c->source == PVSCHED_SRC_HALT)
		c->v->halted = 1;
	else if (s && !(s->flags & PVSCHED_FLAG_IDLE))
		c->v->halted = 0;
	/* an interrupt for a halted vCPU says nothing about its tasks */
	if (!s || c->source == PVSCHED_SRC_WAKEUP || c->source == PVSCHED_SRC_IRQ)
		return PVSCHED_REASON_NONE;
	want->pad = 0;
	if (is_rt(s->policy) && !(s->flags & PVSCHED_FLAG_IDLE)) {
		want->policy = s->policy;
		want->rt_priority = s->rt_priority;
		want->nice = c->v->orig.nice;
		return PVSCHED_REASON_RT_TASK;
	}
	*want = c->v->orig;
	return PVSCHED_REASON_NORMAL;
}
