// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * pvsched guest driver: tells the host, through memory shared with it, what
 * runs on each vCPU (task policy and priority, idle, interrupt context), so
 * that the host's policy can boost the vCPU thread while it matters.
 *
 * The device (PCI 1234:7073) is negotiated through BAR0; the shared area is
 * allocated here and its guest-physical address handed over.  Each vCPU
 * keeps its own slot current from tracepoint probes.  Layout and registers:
 * pyvmm/abi/pvsched_abi.h; negotiation and the seqcount slot writes:
 * pyvmm/guest/common/pvsched_guest.h (shared with the test guest).
 *
 * selftest=1 runs the same probes on an area allocated without the device
 * and exposes it read-only at /sys/kernel/debug/pvsched/shm, so the probes
 * can be checked in a guest that has no pvsched device (e.g. QEMU).
 *
 * Preemption: distro kernels lack the preempt_disable/preempt_enable
 * tracepoints (CONFIG_PREEMPT_TRACER), so PREEMPT_DISABLED is only
 * published where they exist.  NMIs: the nmi_handler tracepoint only fires
 * after each handler and an NMI may land inside an open seqcount section,
 * so NMIs are counted but never written to the slot.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/build_bug.h>
#include <linux/cpumask.h>
#include <linux/debugfs.h>
#include <linux/device.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/percpu.h>
#include <linux/sched.h>
#include <linux/sched/clock.h>
#include <linux/seq_file.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/tracepoint.h>
#include <linux/types.h>
#include <uapi/linux/sched.h>

#include "pvsched_abi.h"

typedef void __iomem *pvsched_bar_t;
#define PVSCHED_BAR_READ32(bar, off) ioread32((bar) + (off))
#define PVSCHED_BAR_WRITE32(bar, off, val) iowrite32((val), (bar) + (off))
#define pvsched_wmb() virt_wmb()
#define PVSCHED_WRITE_ONCE(x, v) WRITE_ONCE(x, v)
#define PVSCHED_READ_ONCE(x) READ_ONCE(x)
#include "pvsched_guest.h"

/* Slots are indexed by Linux CPU number; more than this is not a VM here. */
#define PVSCHED_MAX_VCPUS 4096

static bool selftest;
module_param(selftest, bool, 0444);
MODULE_PARM_DESC(selftest,
		 "Run the probes on an area allocated without the device");

static uint guest_version = PVSCHED_VERSION;
module_param(guest_version, uint, 0444);
MODULE_PARM_DESC(guest_version,
		 "Version the guest speaks (major << 16 | minor)");

/*
 * The features this module implements, and so asks for by default: a
 * feature added to the ABI header joins this mask in the change that
 * implements it here, never before (the host acts on what a guest claims).
 */
#define PVSCHED_MODULE_FEATURES                                                  \
	(PVSCHED_F_CRITICAL_SECTIONS | PVSCHED_F_TASK_PARAMS | PVSCHED_F_HOST_FEEDBACK | \
	 PVSCHED_F_WAKE_HINT | PVSCHED_F_RT_WAITER)

static uint guest_features = PVSCHED_MODULE_FEATURES;
module_param(guest_features, uint, 0444);
MODULE_PARM_DESC(guest_features,
		 "Feature bits the guest wants (masked by the host's)");

static bool force_features;
module_param(force_features, bool, 0444);
MODULE_PARM_DESC(force_features,
		 "Ask for guest_features even if not offered (refusal tests)");

/* One shared area: the device's, or the self-test's. */
struct pvsched_area {
	void *shm;
	size_t size;
	u32 nr_slots;
	u32 version;
	u32 features;
	struct debugfs_blob_wrapper blob;
};

/* The bound device (device mode); device-managed, freed on unbind. */
struct pvsched_dev {
	pvsched_bar_t bar;
	struct pvsched_area area;
};

/* Probe bookkeeping per CPU: nesting depth of each flag's context. */
enum pvsched_ctx {
	PVSCHED_CTX_HARDIRQ,
	PVSCHED_CTX_SOFTIRQ,
	PVSCHED_CTX_PREEMPT,
	PVSCHED_NR_CTX,
};

static const u32 pvsched_ctx_flag[PVSCHED_NR_CTX] = {
	[PVSCHED_CTX_HARDIRQ] = PVSCHED_FLAG_IN_HARDIRQ,
	[PVSCHED_CTX_SOFTIRQ] = PVSCHED_FLAG_IN_SOFTIRQ,
	[PVSCHED_CTX_PREEMPT] = PVSCHED_FLAG_PREEMPT_DISABLED,
};

/* What a slot shows of a running task. */
struct pvsched_task {
	s32 policy;
	u32 rt_priority;
	s32 nice;
};

struct pvsched_cpu {
	u32 depth[PVSCHED_NR_CTX];
	u32 flags; /* critical-section flags the probes track */
	/*
	 * An RT task blocked here and no RT task has run here since: it will
	 * most likely wake here, so an idle slot shows RT_WAITING (F_RT_WAITER).
	 * A heuristic: a sleeper that wakes on another CPU leaves it set (the
	 * host then boosts the halt as it would without the feature), and a
	 * second RT task running here clears it for the first.
	 */
	u32 rt_sleeper;
	/*
	 * The parameters last published for the task running here (unused
	 * while idle).  A task can change its own policy without a switch
	 * (chrt sets its own and execs), so interrupt entries compare these
	 * with the running task's and publish again when they differ.
	 */
	struct pvsched_task shown;
};

static DEFINE_PER_CPU(struct pvsched_cpu, pvsched_cpu);

/* Counters, per CPU, summed in debugfs pvsched/stats. */
enum pvsched_stat {
	PVSCHED_STAT_SWITCHES,
	PVSCHED_STAT_SWITCH_IDLE,
	PVSCHED_STAT_SWITCH_RT,
	PVSCHED_STAT_SWITCH_IDLE_RT_WAITING,
	PVSCHED_STAT_WAKE_HINT_SET,
	PVSCHED_STAT_WAKE_HINT_CLEARED,
	PVSCHED_STAT_HARDIRQ_ENTRY,
	PVSCHED_STAT_HARDIRQ_SEEN_SET,
	PVSCHED_STAT_HARDIRQ_SEEN_CLEAR,
	PVSCHED_STAT_SOFTIRQ_ENTRY,
	PVSCHED_STAT_SOFTIRQ_SEEN_SET,
	PVSCHED_STAT_SOFTIRQ_SEEN_CLEAR,
	PVSCHED_STAT_PREEMPT_ENTRY,
	PVSCHED_STAT_UNBALANCED_EXIT,
	PVSCHED_STAT_READBACK_MISMATCH,
	PVSCHED_STAT_NMI,
	PVSCHED_STAT_NO_SLOT,
	PVSCHED_STAT_TASK_REFRESHED,
	PVSCHED_NR_STATS,
};

static const char *const pvsched_stat_names[PVSCHED_NR_STATS][2] = {
	{ "switches", "sched_switch events written to a slot" },
	{ "switch_idle", "switches to the idle task (IDLE set)" },
	{ "switch_rt", "switches to a FIFO/RR task" },
	{ "switch_idle_rt_waiting", "switches to idle with an RT task asleep here (RT_WAITING set)" },
	{ "wake_hint_set", "RT wakeups onto another vCPU (its wake_hint set)" },
	{ "wake_hint_cleared", "wake hints cleared by their owner" },
	{ "hardirq_entry", "outermost hard interrupt entries" },
	{ "hardirq_seen_set", "IN_HARDIRQ read back set after entry" },
	{ "hardirq_seen_clear", "IN_HARDIRQ read back clear after exit" },
	{ "softirq_entry", "outermost softirq entries" },
	{ "softirq_seen_set", "IN_SOFTIRQ read back set after entry" },
	{ "softirq_seen_clear", "IN_SOFTIRQ read back clear after exit" },
	{ "preempt_entry", "outermost preempt_disable events" },
	{ "unbalanced_exit", "exits without entry (probes added mid-way)" },
	{ "readback_mismatch", "slot flags read back unlike the write" },
	{ "nmi", "NMI handlers run (counted, never written)" },
	{ "no_slot", "events on a CPU beyond the host's vCPU count" },
	{ "task_refreshed", "running tasks published again at an interrupt: their policy changed without a switch" },
};

static DEFINE_PER_CPU(u64[PVSCHED_NR_STATS], pvsched_stats);

static inline void pvsched_count(enum pvsched_stat s)
{
	this_cpu_inc(pvsched_stats[s]);
}

/*
 * The area the probes write.  Set before the probes are registered and
 * cleared only after tracepoint_synchronize_unregister(), so a probe never
 * sees it change under it.
 */
static struct pvsched_area *pvsched_active;
static DEFINE_MUTEX(pvsched_lock); /* serialises activate/deactivate */
static struct dentry *pvsched_debugfs;

/* This CPU's guest area, or NULL when the host gave it no slot. */
static inline struct pvsched_guest_area *
pvsched_this_slot(struct pvsched_area *a)
{
	unsigned int cpu = smp_processor_id();

	if (unlikely(cpu >= a->nr_slots)) {
		pvsched_count(PVSCHED_STAT_NO_SLOT);
		return NULL;
	}
	return &pvsched_slot(a->shm, cpu)->guest;
}

static inline bool pvsched_is_rt(int policy)
{
	return policy == SCHED_FIFO || policy == SCHED_RR;
}

/*
 * What a slot shows of non-idle task p: its policy, RT priority (0 unless
 * FIFO/RR) and nice with F_TASK_PARAMS, else an ordinary task.
 */
static void pvsched_task_params(const struct pvsched_area *a,
				struct task_struct *p, struct pvsched_task *out)
{
	out->policy = PVSCHED_POLICY_OTHER;
	out->rt_priority = 0;
	out->nice = 0;
	if (!(a->features & PVSCHED_F_TASK_PARAMS))
		return;
	out->policy = READ_ONCE(p->policy);
	out->nice = task_nice(p);
	if (pvsched_is_rt(out->policy))
		out->rt_priority = READ_ONCE(p->rt_priority);
}

/*
 * Publish the task now on this CPU (irqs off, owner CPU); the switch
 * counters count only publications at_switch.
 */
static void pvsched_publish_task(struct pvsched_area *a,
				 struct task_struct *p, bool at_switch)
{
	struct pvsched_guest_area *g = pvsched_this_slot(a);
	struct pvsched_cpu *pc = this_cpu_ptr(&pvsched_cpu);
	struct pvsched_task task = {};
	u32 flags = pc->flags;

	if (!g)
		return;
	if (is_idle_task(p)) {
		flags |= PVSCHED_FLAG_IDLE;
		if (at_switch)
			pvsched_count(PVSCHED_STAT_SWITCH_IDLE);
		if ((a->features & PVSCHED_F_RT_WAITER) && pc->rt_sleeper) {
			flags |= PVSCHED_FLAG_RT_WAITING;
			if (at_switch)
				pvsched_count(PVSCHED_STAT_SWITCH_IDLE_RT_WAITING);
		}
	} else {
		pvsched_task_params(a, p, &task);
		if (at_switch && pvsched_is_rt(task.policy))
			pvsched_count(PVSCHED_STAT_SWITCH_RT);
	}
	pc->shown = task;
	pvsched_set_task(g, flags, task.policy, task.rt_priority, task.nice, local_clock());
	if ((a->features & PVSCHED_F_WAKE_HINT) && pvsched_is_rt(p->policy) &&
	    READ_ONCE(g->wake_hint)) {
		pvsched_clear_wake_hint(g);
		pvsched_count(PVSCHED_STAT_WAKE_HINT_CLEARED);
	}
	if (at_switch)
		pvsched_count(PVSCHED_STAT_SWITCHES);
}

/*
 * At an interrupt's entry (owner CPU): publish the interrupted
 * task again if its parameters changed since its switch.  A task that sets
 * its own policy and then spins (chrt then exec) would otherwise show its
 * old policy until it next leaves the CPU, which an RT spinner may never
 * do.  A running task takes at least the timer's interrupts, so a slot is
 * at most one tick stale.
 */
static void pvsched_refresh_task(void)
{
	struct pvsched_area *a = READ_ONCE(pvsched_active);
	const struct pvsched_task *shown;
	struct pvsched_task now;
	unsigned long irqflags;

	/* no slot here: publish_task() would not record it, and each interrupt would retry */
	if (!a || !(a->features & PVSCHED_F_TASK_PARAMS) || is_idle_task(current) ||
	    raw_smp_processor_id() >= a->nr_slots)
		return;
	raw_local_irq_save(irqflags);
	shown = this_cpu_ptr(&pvsched_cpu.shown);
	pvsched_task_params(a, current, &now);
	if (now.policy != shown->policy || now.rt_priority != shown->rt_priority ||
	    now.nice != shown->nice) {
		pvsched_count(PVSCHED_STAT_TASK_REFRESHED);
		pvsched_publish_task(a, current, false);
	}
	raw_local_irq_restore(irqflags);
}

static inline bool pvsched_is_user_rt(const struct task_struct *p)
{
	return pvsched_is_rt(p->policy) && !(p->flags & PF_KTHREAD);
}

static void notrace pvsched_probe_sched_switch(void *data, bool preempt,
					       struct task_struct *prev,
					       struct task_struct *next,
					       unsigned int prev_state)
{
	struct pvsched_area *a = READ_ONCE(pvsched_active);
	unsigned long irqflags;

	if (!a)
		return;
	raw_local_irq_save(irqflags);
	/*
	 * A user RT task that blocked (not preempted, not exiting) sleeps here.
	 * Kernel threads do not count: migration/N shows as FIFO 99 and would
	 * keep the flag set for good.
	 */
	if (pvsched_is_user_rt(prev) && !preempt && prev_state != TASK_RUNNING &&
	    !(prev_state & (TASK_DEAD | EXIT_DEAD | EXIT_ZOMBIE)))
		this_cpu_write(pvsched_cpu.rt_sleeper, 1);
	if (pvsched_is_user_rt(next))
		this_cpu_write(pvsched_cpu.rt_sleeper, 0);
	pvsched_publish_task(a, next, true);
	raw_local_irq_restore(irqflags);
}

/* An RT task woken onto another vCPU: hint that vCPU's host thread. */
static void pvsched_wake_hint(struct task_struct *p)
{
	struct pvsched_area *a = READ_ONCE(pvsched_active);
	unsigned int target;

	if (!a || !(a->features & PVSCHED_F_WAKE_HINT) ||
	    !pvsched_is_rt(p->policy))
		return;
	target = task_cpu(p);
	/* Called with irqs off (p->pi_lock or the rq lock): CPU is stable. */
	if (target == raw_smp_processor_id() || target >= a->nr_slots)
		return;
	pvsched_set_wake_hint(&pvsched_slot(a->shm, target)->guest);
	pvsched_count(PVSCHED_STAT_WAKE_HINT_SET);
}

/*
 * sched_waking fires on the waker's CPU before the target is chosen, so
 * task_cpu() is only the target for a task pinned to one CPU (the usual RT
 * set-up); sched_wakeup fires once it is chosen, but when the wakeup is
 * queued to the target (TTWU_QUEUE) it fires there, where no hint is
 * needed: that vCPU is already running.
 */
static void notrace pvsched_probe_sched_waking(void *data,
					       struct task_struct *p)
{
	if (p->nr_cpus_allowed == 1)
		pvsched_wake_hint(p);
}

static void notrace pvsched_probe_sched_wakeup(void *data,
					       struct task_struct *p)
{
	if (p->nr_cpus_allowed != 1)
		pvsched_wake_hint(p);
}

/*
 * Enter or leave a flag's context.  Depth-counted so that nesting (a
 * hardirq inside a softirq, two hardirq vectors) sets the flag at the
 * outermost entry and clears it at the matching exit only.
 */
static void pvsched_ctx_event(enum pvsched_ctx ctx, bool enter)
{
	static const enum pvsched_stat entry_stat[PVSCHED_NR_CTX] = {
		PVSCHED_STAT_HARDIRQ_ENTRY, PVSCHED_STAT_SOFTIRQ_ENTRY,
		PVSCHED_STAT_PREEMPT_ENTRY,
	};
	/* [ctx][enter]: flag read back clear after exit / set after entry */
	static const enum pvsched_stat seen_stat[PVSCHED_NR_CTX][2] = {
		{ PVSCHED_STAT_HARDIRQ_SEEN_CLEAR,
		  PVSCHED_STAT_HARDIRQ_SEEN_SET },
		{ PVSCHED_STAT_SOFTIRQ_SEEN_CLEAR,
		  PVSCHED_STAT_SOFTIRQ_SEEN_SET },
		{ PVSCHED_NR_STATS, PVSCHED_NR_STATS },
	};
	struct pvsched_area *a = READ_ONCE(pvsched_active);
	struct pvsched_guest_area *g;
	struct pvsched_cpu *pc;
	unsigned long irqflags;
	u32 bit = pvsched_ctx_flag[ctx];
	u32 now;

	if (!a || !(a->features & PVSCHED_F_CRITICAL_SECTIONS))
		return;
	/* softirq and preempt events come with irqs on: no nested writes. */
	raw_local_irq_save(irqflags);
	pc = this_cpu_ptr(&pvsched_cpu);
	if (enter) {
		if (pc->depth[ctx]++)
			goto out;
		pc->flags |= bit;
		pvsched_count(entry_stat[ctx]);
	} else {
		if (!pc->depth[ctx]) {
			pvsched_count(PVSCHED_STAT_UNBALANCED_EXIT);
			goto out;
		}
		if (--pc->depth[ctx])
			goto out;
		pc->flags &= ~bit;
	}
	g = pvsched_this_slot(a);
	if (!g)
		goto out;
	pvsched_update_flags(g, enter ? bit : 0, enter ? 0 : bit,
			     local_clock());
	/* Read the slot back: the self-test counts what a host would see. */
	now = READ_ONCE(g->flags);
	if (enter != !!(now & bit))
		pvsched_count(PVSCHED_STAT_READBACK_MISMATCH);
	else if (seen_stat[ctx][enter] != PVSCHED_NR_STATS)
		pvsched_count(seen_stat[ctx][enter]);
out:
	raw_local_irq_restore(irqflags);
}

static void notrace pvsched_probe_irq_entry(void *data, int irq,
					    struct irqaction *action)
{
	pvsched_ctx_event(PVSCHED_CTX_HARDIRQ, true);
	pvsched_refresh_task();
}

static void notrace pvsched_probe_irq_exit(void *data, int irq,
					   struct irqaction *action, int ret)
{
	pvsched_ctx_event(PVSCHED_CTX_HARDIRQ, false);
}

/* x86 system vectors (local timer, IPIs) bypass irq_handler_entry. */
static void notrace pvsched_probe_vector_entry(void *data, int vector)
{
	pvsched_ctx_event(PVSCHED_CTX_HARDIRQ, true);
	pvsched_refresh_task();
}

static void notrace pvsched_probe_vector_exit(void *data, int vector)
{
	pvsched_ctx_event(PVSCHED_CTX_HARDIRQ, false);
}

static void notrace pvsched_probe_softirq_entry(void *data,
						unsigned int vec_nr)
{
	pvsched_ctx_event(PVSCHED_CTX_SOFTIRQ, true);
}

static void notrace pvsched_probe_softirq_exit(void *data,
					       unsigned int vec_nr)
{
	pvsched_ctx_event(PVSCHED_CTX_SOFTIRQ, false);
}

static void notrace pvsched_probe_preempt_disable(void *data,
						  unsigned long ip,
						  unsigned long parent_ip)
{
	pvsched_ctx_event(PVSCHED_CTX_PREEMPT, true);
}

static void notrace pvsched_probe_preempt_enable(void *data,
						 unsigned long ip,
						 unsigned long parent_ip)
{
	pvsched_ctx_event(PVSCHED_CTX_PREEMPT, false);
}

/* NMI context: a per-CPU increment only (see the header comment). */
static void notrace pvsched_probe_nmi(void *data, void *handler,
				      s64 delta_ns, int handled)
{
	pvsched_count(PVSCHED_STAT_NMI);
}

struct pvsched_tp {
	const char *name;
	void *probe;
	bool required;
	struct tracepoint *tp;
	bool registered;
};

#define PVSCHED_TP(n, p, r) { .name = n, .probe = (void *)(p), .required = r }

/* Exits before entries: a probe pair half-registered only loses events. */
static struct pvsched_tp pvsched_tps[] = {
	PVSCHED_TP("sched_switch", pvsched_probe_sched_switch, true),
	PVSCHED_TP("sched_waking", pvsched_probe_sched_waking, true),
	PVSCHED_TP("sched_wakeup", pvsched_probe_sched_wakeup, true),
	PVSCHED_TP("irq_handler_exit", pvsched_probe_irq_exit, true),
	PVSCHED_TP("irq_handler_entry", pvsched_probe_irq_entry, true),
	PVSCHED_TP("softirq_exit", pvsched_probe_softirq_exit, true),
	PVSCHED_TP("softirq_entry", pvsched_probe_softirq_entry, true),
	PVSCHED_TP("local_timer_exit", pvsched_probe_vector_exit, false),
	PVSCHED_TP("local_timer_entry", pvsched_probe_vector_entry, false),
	PVSCHED_TP("reschedule_exit", pvsched_probe_vector_exit, false),
	PVSCHED_TP("reschedule_entry", pvsched_probe_vector_entry, false),
	PVSCHED_TP("call_function_exit", pvsched_probe_vector_exit, false),
	PVSCHED_TP("call_function_entry", pvsched_probe_vector_entry, false),
	PVSCHED_TP("call_function_single_exit", pvsched_probe_vector_exit,
		   false),
	PVSCHED_TP("call_function_single_entry", pvsched_probe_vector_entry,
		   false),
	PVSCHED_TP("irq_work_exit", pvsched_probe_vector_exit, false),
	PVSCHED_TP("irq_work_entry", pvsched_probe_vector_entry, false),
	PVSCHED_TP("nmi_handler", pvsched_probe_nmi, false),
	PVSCHED_TP("preempt_enable", pvsched_probe_preempt_enable, false),
	PVSCHED_TP("preempt_disable", pvsched_probe_preempt_disable, false),
};

static void pvsched_find_tp(struct tracepoint *tp, void *priv)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(pvsched_tps); i++)
		if (!strcmp(tp->name, pvsched_tps[i].name))
			pvsched_tps[i].tp = tp;
}

static void pvsched_unregister_probes(void)
{
	size_t i;

	for (i = ARRAY_SIZE(pvsched_tps); i-- > 0;) {
		struct pvsched_tp *t = &pvsched_tps[i];

		if (!t->registered)
			continue;
		tracepoint_probe_unregister(t->tp, t->probe, NULL);
		t->registered = false;
	}
	/* No probe runs past this point: the area may go. */
	tracepoint_synchronize_unregister();
}

static int pvsched_register_probes(void)
{
	size_t i;
	int rc;

	for_each_kernel_tracepoint(pvsched_find_tp, NULL);
	for (i = 0; i < ARRAY_SIZE(pvsched_tps); i++) {
		struct pvsched_tp *t = &pvsched_tps[i];

		if (!t->tp) {
			if (t->required) {
				pr_err("tracepoint %s not found\n", t->name);
				rc = -ENOENT;
				goto out_unregister;
			}
			pr_debug("tracepoint %s absent in this kernel\n",
				 t->name);
			continue;
		}
		rc = tracepoint_probe_register(t->tp, t->probe, NULL);
		if (rc) {
			pr_err("registering %s failed [rc=%d]\n", t->name, rc);
			goto out_unregister;
		}
		t->registered = true;
	}
	return 0;

out_unregister:
	pvsched_unregister_probes();
	return rc;
}

/* Seed every slot with what its CPU runs now (IPI: irqs off, owner CPU). */
static void pvsched_sync_cpu(void *info)
{
	struct pvsched_area *a = info;

	pvsched_publish_task(a, current, false);
}

static int pvsched_stats_show(struct seq_file *m, void *v)
{
	unsigned int cpu, s;

	for (s = 0; s < PVSCHED_NR_STATS; s++) {
		u64 sum = 0;

		for_each_possible_cpu(cpu)
			sum += per_cpu(pvsched_stats, cpu)[s];
		seq_printf(m, "%s %llu\n", pvsched_stat_names[s][0], sum);
	}
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_stats);

static int pvsched_stat_help_show(struct seq_file *m, void *v)
{
	unsigned int s;

	for (s = 0; s < PVSCHED_NR_STATS; s++)
		seq_printf(m, "%-20s %s\n", pvsched_stat_names[s][0],
			   pvsched_stat_names[s][1]);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_stat_help);

static int pvsched_tracepoints_show(struct seq_file *m, void *v)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(pvsched_tps); i++)
		seq_printf(m, "%s %s\n", pvsched_tps[i].name,
			   pvsched_tps[i].registered ? "registered" :
			   pvsched_tps[i].tp ? "found" : "absent");
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_tracepoints);

/* One JSON object per slot, read like a host would: seqcount retry. */
static int pvsched_slots_show(struct seq_file *m, void *v)
{
	struct pvsched_area *a = m->private;
	u32 i;

	for (i = 0; i < a->nr_slots; i++) {
		struct pvsched_guest_area *g = &pvsched_slot(a->shm, i)->guest;
		struct pvsched_host_area *h = &pvsched_slot(a->shm, i)->host;
		struct pvsched_guest_area c;
		unsigned int tries = 0;
		u32 seq;

		do {
			seq = READ_ONCE(g->seq);
			virt_rmb();
			c.flags = READ_ONCE(g->flags);
			c.policy = READ_ONCE(g->policy);
			c.rt_priority = READ_ONCE(g->rt_priority);
			c.nice = READ_ONCE(g->nice);
			c.guest_ns = READ_ONCE(g->guest_ns);
			virt_rmb();
		} while (((seq & 1) || READ_ONCE(g->seq) != seq) &&
			 ++tries < 1000);
		seq_printf(m,
			   "{\"cpu\":%u,\"seq\":%u,\"consistent\":%s,\"flags\":%u,\"policy\":%d,\"rt_priority\":%u,\"nice\":%d,\"wake_hint\":%u,\"guest_ns\":%llu,",
			   i, seq, tries < 1000 ? "true" : "false", c.flags,
			   c.policy, c.rt_priority, c.nice,
			   READ_ONCE(g->wake_hint), c.guest_ns);
		/* What the host says it applied (HOST_FEEDBACK; 0 in self-test). */
		seq_printf(m,
			   "\"host_state\":%u,\"host_policy\":%d,\"host_rt_priority\":%u,\"host_boosts\":%llu,\"host_throttles\":%llu}\n",
			   READ_ONCE(h->state), READ_ONCE(h->policy),
			   READ_ONCE(h->rt_priority), READ_ONCE(h->boosts),
			   READ_ONCE(h->throttles));
	}
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_slots);

static int pvsched_info_show(struct seq_file *m, void *v)
{
	struct pvsched_area *a = m->private;

	seq_printf(m,
		   "mode %s\nversion 0x%08x\nfeatures 0x%x\nslots %u\nsize %zu\n",
		   selftest ? "selftest" : "device", a->version, a->features,
		   a->nr_slots, a->size);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(pvsched_info);

static void pvsched_debugfs_create(struct pvsched_area *a)
{
	struct dentry *d = debugfs_create_dir(KBUILD_MODNAME, NULL);

	a->blob.data = a->shm;
	a->blob.size = a->size;
	debugfs_create_blob("shm", 0444, d, &a->blob);
	debugfs_create_file("slots", 0444, d, a, &pvsched_slots_fops);
	debugfs_create_file("info", 0444, d, a, &pvsched_info_fops);
	debugfs_create_file("stats", 0444, d, NULL, &pvsched_stats_fops);
	debugfs_create_file("stats_help", 0444, d, NULL,
			    &pvsched_stat_help_fops);
	debugfs_create_file("tracepoints", 0444, d, NULL,
			    &pvsched_tracepoints_fops);
	pvsched_debugfs = d;
}

/* Start writing slots of area a: probes, initial contents, debugfs. */
static int pvsched_activate(struct pvsched_area *a)
{
	unsigned int cpu;
	int rc;

	mutex_lock(&pvsched_lock);
	if (pvsched_active) {
		rc = -EBUSY;
		goto out_unlock;
	}
	for_each_possible_cpu(cpu) {
		memset(per_cpu_ptr(&pvsched_cpu, cpu), 0,
		       sizeof(struct pvsched_cpu));
		memset(per_cpu_ptr(&pvsched_stats, cpu), 0,
		       sizeof(pvsched_stats));
	}
	WRITE_ONCE(pvsched_active, a);
	rc = pvsched_register_probes();
	if (rc)
		goto out_clear_active;
	on_each_cpu(pvsched_sync_cpu, a, 1);
	pvsched_debugfs_create(a);
	mutex_unlock(&pvsched_lock);
	return 0;

out_clear_active:
	WRITE_ONCE(pvsched_active, NULL);
out_unlock:
	mutex_unlock(&pvsched_lock);
	return rc;
}

/* Stop writing slots: after this returns no probe touches the area. */
static void pvsched_deactivate(void)
{
	mutex_lock(&pvsched_lock);
	debugfs_remove_recursive(pvsched_debugfs);
	pvsched_debugfs = NULL;
	pvsched_unregister_probes();
	WRITE_ONCE(pvsched_active, NULL);
	mutex_unlock(&pvsched_lock);
}

static int pvsched_area_alloc(struct pvsched_area *a, u32 nr_slots)
{
	a->nr_slots = nr_slots;
	a->size = pvsched_shm_bytes(nr_slots);
	/*
	 * Physically contiguous and zeroed: the host maps it by GPA.  It reads
	 * guest memory directly, not through any IOMMU, so the address is
	 * virt_to_phys() (as legacy virtio's), not a DMA API handle.
	 */
	a->shm = alloc_pages_exact(a->size, GFP_KERNEL | __GFP_ZERO);
	return a->shm ? 0 : -ENOMEM;
}

static void pvsched_area_free(struct pvsched_area *a)
{
	free_pages_exact(a->shm, a->size);
	a->shm = NULL;
}

/* devres actions for what has no managed form (see pvsched_pci_probe). */
static void pvsched_area_release(void *area)
{
	pvsched_area_free(area);
}

static void pvsched_disable_release(void *data)
{
	struct pvsched_dev *pd = data;

	/* The host forgets the area (and restores its vCPU threads). */
	pvsched_disable(pd->bar);
}

static void pvsched_deactivate_release(void *unused)
{
	pvsched_deactivate();
}

/*
 * Everything the probe sets up is device-managed: on a failed probe and on
 * unbind (rmmod included) devres undoes it in reverse order, so the probes
 * stop before the host is told DISABLE, the host lets go of the area before
 * it is freed, and BAR0 stays mapped (and the device enabled) until both
 * are done.  So the driver has no .remove: nothing is left for it to do.
 */
static int pvsched_pci_probe(struct pci_dev *pdev,
			     const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct pvsched_negotiation neg;
	struct pvsched_dev *pd;
	u32 nr_vcpus;
	int rc;

	pd = devm_kzalloc(dev, sizeof(*pd), GFP_KERNEL);
	if (!pd)
		return -ENOMEM;

	rc = pcim_enable_device(pdev);
	if (rc) {
		dev_err(dev, "enabling the device failed [rc=%d]\n", rc);
		return rc;
	}
	/* Registers are read below up to PVSCHED_BAR0_SIZE: BAR0 must hold them. */
	if (!(pci_resource_flags(pdev, 0) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, 0) < PVSCHED_BAR0_SIZE) {
		rc = -ENODEV;
		dev_err(dev, "BAR0 is not %u bytes of memory [rc=%d]\n",
			PVSCHED_BAR0_SIZE, rc);
		return rc;
	}
	rc = pcim_iomap_regions(pdev, BIT(0), KBUILD_MODNAME);
	if (rc) {
		dev_err(dev, "requesting and mapping BAR0 failed [rc=%d]\n", rc);
		return rc;
	}
	pd->bar = pcim_iomap_table(pdev)[0];

	if (PVSCHED_BAR_READ32(pd->bar, PVSCHED_REG_MAGIC) != PVSCHED_MAGIC) {
		rc = -ENODEV;
		dev_err(dev, "BAR0 has no pvsched magic [rc=%d]\n", rc);
		return rc;
	}
	nr_vcpus = PVSCHED_BAR_READ32(pd->bar, PVSCHED_REG_NR_VCPUS);
	if (!nr_vcpus || nr_vcpus > PVSCHED_MAX_VCPUS) {
		rc = -EINVAL;
		dev_err(dev, "host reports %u vCPUs [rc=%d]\n", nr_vcpus, rc);
		return rc;
	}
	rc = pvsched_area_alloc(&pd->area, nr_vcpus);
	if (rc) {
		dev_err(dev, "allocating %u slots failed [rc=%d]\n", nr_vcpus,
			rc);
		return rc;
	}
	rc = devm_add_action_or_reset(dev, pvsched_area_release, &pd->area);
	if (rc)
		return rc;

	pvsched_negotiate(pd->bar, pd->area.shm, virt_to_phys(pd->area.shm),
			  pd->area.size, guest_version, guest_features,
			  force_features, &neg);
	if (neg.status != PVSCHED_STATUS_ACTIVE) {
		rc = -EPROTO;
		dev_err(dev,
			"host refused: status %d (host version 0x%x features 0x%x, asked 0x%x/0x%x) [rc=%d]\n",
			neg.status, neg.host_version, neg.host_features,
			neg.version, neg.features, rc);
		return rc;
	}
	/* Registered after the area's release, so it runs before it. */
	rc = devm_add_action_or_reset(dev, pvsched_disable_release, pd);
	if (rc)
		return rc;
	pd->area.version = neg.version;
	pd->area.features = neg.features;

	rc = pvsched_activate(&pd->area);
	if (rc) {
		dev_err(dev, "starting the probes failed [rc=%d]\n", rc);
		return rc;
	}
	/* Registered last: on unbind the probes stop first. */
	rc = devm_add_action_or_reset(dev, pvsched_deactivate_release, NULL);
	if (rc)
		return rc;
	dev_info(dev,
		 "active: version 0x%x features 0x%x, %u vCPU slots at GPA 0x%llx\n",
		 neg.version, neg.features, nr_vcpus,
		 (unsigned long long)virt_to_phys(pd->area.shm));
	return 0;
}

static const struct pci_device_id pvsched_pci_ids[] = {
	{ PCI_DEVICE(PVSCHED_PCI_VENDOR_ID, PVSCHED_PCI_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, pvsched_pci_ids);

static struct pci_driver pvsched_pci_driver = {
	.name = KBUILD_MODNAME,
	.id_table = pvsched_pci_ids,
	.probe = pvsched_pci_probe,
};

static struct pvsched_area pvsched_selftest_area;

static int __init pvsched_selftest_start(void)
{
	struct pvsched_area *a = &pvsched_selftest_area;
	int rc;

	rc = pvsched_area_alloc(a, nr_cpu_ids);
	if (rc) {
		pr_err("self-test: allocating %u slots failed [rc=%d]\n",
		       nr_cpu_ids, rc);
		return rc;
	}
	a->version = guest_version;
	a->features = guest_features & PVSCHED_F_ALL;
	pvsched_init_header(a->shm, a->version, a->features, a->nr_slots);
	rc = pvsched_activate(a);
	if (rc) {
		pr_err("self-test: starting the probes failed [rc=%d]\n", rc);
		goto out_free_area;
	}
	pr_info("self-test: %u slots, features 0x%x, area in debugfs %s/shm\n",
		a->nr_slots, a->features, KBUILD_MODNAME);
	return 0;

out_free_area:
	pvsched_area_free(a);
	return rc;
}

static int __init pvsched_init(void)
{
	/* Slots carry Linux's own SCHED_* numbers. */
	BUILD_BUG_ON(SCHED_NORMAL != PVSCHED_POLICY_OTHER);
	BUILD_BUG_ON(SCHED_FIFO != PVSCHED_POLICY_FIFO);
	BUILD_BUG_ON(SCHED_RR != PVSCHED_POLICY_RR);
	BUILD_BUG_ON(SCHED_BATCH != PVSCHED_POLICY_BATCH);
	BUILD_BUG_ON(SCHED_IDLE != PVSCHED_POLICY_IDLE);
	BUILD_BUG_ON(SCHED_DEADLINE != PVSCHED_POLICY_DEADLINE);

	if (selftest)
		return pvsched_selftest_start();
	return pci_register_driver(&pvsched_pci_driver);
}

static void __exit pvsched_exit(void)
{
	if (selftest) {
		pvsched_deactivate();
		pvsched_area_free(&pvsched_selftest_area);
		return;
	}
	pci_unregister_driver(&pvsched_pci_driver);
}

module_init(pvsched_init);
module_exit(pvsched_exit);

MODULE_DESCRIPTION("pvsched guest driver: vCPU scheduling hints for the host");
MODULE_LICENSE("Dual MIT/GPL");
