// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Kernel half of the test guest (CPL0).  KVM's PVM backend emulates CPL0
 * code (README.md in this folder says what that costs), so this file does
 * only what needs privilege: descriptor tables, LAPIC timer, PCI/pvsched
 * setup on vCPU 0, slot writes, halting and a handful of system calls.
 * Workloads, arithmetic and JSON output are in user.c at CPL3 (native).
 */
#include "arch.h"
#include "guest.h"
#include "fmt.h"
#include "kernel.h"
#include "pvsched_guest.h"
#include "testguest_boot.h"  /* boot_info, the exit and COM1 ports */

#define KSTACK_SIZE (1u << 14) /* KSTACK_SHIFT in entry.S */
#define USTACK_SIZE (1u << 15)

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_ASSERT (1u << 14)
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
#define LVT_MASKED (1u << 16)
#define LVT_TSC_DEADLINE (2u << 17)
#define MSR_TSC_DEADLINE 0x6e0
#define CPUID_1_ECX_TSC_DEADLINE (1u << 24)

#define VEC_SYSCALL 3 /* int3 */
#define VEC_TIMER 0x20
#define VEC_WAKE 0x21
#define VEC_SPURIOUS 0xff

/* Linux's GDT layout (KVM's PVM backend knows the host's user selectors). */
#define SEL_KCODE 0x10
#define SEL_KDATA 0x18
#define SEL_UCODE32 0x23
#define SEL_UDATA 0x2b
#define SEL_UCODE 0x33
#define GDT_TSS0 8
#define SEL_TSS(i) ((GDT_TSS0 + 2 * (i)) * 8)

struct tg_global tg;
struct tg_irq_stamp tg_irq[TG_MAX_VCPUS];
struct tg_wake_msg tg_wake[TG_MAX_VCPUS];
struct tg_cpu_share tg_cpu[TG_MAX_VCPUS];

/* Per vCPU, at the base of its kernel stack (found from %rsp in two instructions). */
struct percpu {
	struct pvsched_guest_area *slot; /* shared slot, or the dummy below */
	u32 id;
	volatile u32 woken;
	u32 ipi_pending; /* a wake IPI came while not waiting for one */
	s32 policy; /* the task running on this vCPU, published on wakeup */
	u32 rt_priority;
	s32 nice;
	u32 tsc_deadline;
	u64 tsc_khz;
	u64 tick; /* SYS_TICK period in TSC cycles, 0 for none */
	struct pvsched_slot dummy __attribute__((aligned(CACHELINE)));
};

u8 kstacks[TG_MAX_VCPUS][KSTACK_SIZE] __attribute__((aligned(KSTACK_SIZE)));
static u8 ustacks[TG_MAX_VCPUS][USTACK_SIZE] __attribute__((aligned(4096)));

struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

static struct {
	struct tss t;
} __attribute__((aligned(128))) tss[TG_MAX_VCPUS];

/* Linux's layout (see SEL_*), then a 16-byte TSS descriptor per vCPU. */
static u64 gdt[GDT_TSS0 + 2 * TG_MAX_VCPUS] __attribute__((aligned(16))) = {
	[1] = 0x00cf9a000000ffffull, /* 0x08 kernel code, 32-bit (unused) */
	[2] = 0x00af9a000000ffffull, /* 0x10 kernel code, 64-bit */
	[3] = 0x00cf92000000ffffull, /* 0x18 kernel data */
	[4] = 0x00cffa000000ffffull, /* 0x20 user code, 32-bit (unused) */
	[5] = 0x00cff2000000ffffull, /* 0x28 user data */
	[6] = 0x00affa000000ffffull, /* 0x30 user code, 64-bit */
};

static u64 idt[256 * 2] __attribute__((aligned(4096)));
static volatile u32 idt_ready;
static char cmdline_copy[4096];

/* The shared area: contiguous pages of our own memory, sized for the most vCPUs. */
static u8 pv_area[(PVSCHED_SLOT_OFFSET + PVSCHED_SLOT_SIZE * TG_MAX_VCPUS +
		   PVSCHED_PAGE_SIZE - 1) & ~(PVSCHED_PAGE_SIZE - 1)]
	__attribute__((aligned(PVSCHED_PAGE_SIZE)));

extern char _end[];
extern const u64 exc_stubs[32];
extern u64 pml4[];
void syscall_trap(void);
void timer_entry(void);
void wake_entry(void);
void irq_ignore(void);
void irq_spurious(void);
void idle_halt(void); /* sti; hlt; cli, safe from PVM's missing STI shadow (entry.S) */
void enter_user(void (*rip)(u32), void *rsp, u64 arg, u64 cs, u64 ss) __attribute__((noreturn));

static u64 ns_mult; /* ns = tsc * ns_mult >> 32 */

static inline struct percpu *this_cpu(void)
{
	u64 sp;

	__asm__ __volatile__("mov %%rsp, %0" : "=r"(sp));
	return (struct percpu *)(sp & ~(u64)(KSTACK_SIZE - 1));
}

static inline u64 tsc_ns(u64 tsc)
{
	return (u64)(((unsigned __int128)tsc * ns_mult) >> 32);
}

static inline u64 now_ns(void)
{
	return tsc_ns(rdtsc());
}

static inline void lapic_write(u32 reg, u32 v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

/* ---- console and exit ------------------------------------------------- */

static void kwrite(const char *s, u32 len)
{
	while (len--)
		outb(PVSCHED_COM1_PORT, (u8)*s++);
}

static void kputs_locked(const char *s)
{
	kwrite(s, tg_strlen(s));
}

void kputs(const char *s)
{
	console_lock();
	kputs_locked(s);
	console_unlock();
}

void __attribute__((noreturn)) kexit(u32 code)
{
	outb(PVSCHED_TESTGUEST_EXIT_PORT, (u8)code);
	for (;;)
		__asm__ __volatile__("cli; hlt");
}

/* One {"type":"error"} record, then end the VM with `code`. */
void __attribute__((noreturn)) kfail(u32 code, const char *msg)
{
	char line[256];
	struct buf b;

	buf_init(&b, line, sizeof(line));
	buf_str(&b, "{\"type\":\"error\",\"message\":");
	buf_jstr(&b, msg);
	buf_str(&b, ",\"exit\":");
	buf_u64(&b, code);
	buf_str(&b, "}\n");
	tg.failed = 1;
	if (console_trylock(100000)) {
		kputs_locked(line);
		console_unlock();
	} else {
		kputs_locked(line);
	}
	kexit(code);
}

struct exc_frame {
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

void __attribute__((noreturn)) exception_handler(struct exc_frame *f)
{
	char msg[160];
	struct buf b;
	u64 cr2;

	__asm__ __volatile__("mov %%cr2, %0" : "=r"(cr2));
	buf_init(&b, msg, sizeof(msg));
	buf_str(&b, "exception ");
	buf_u64(&b, f->vector);
	buf_str(&b, " error ");
	buf_hex(&b, f->error);
	buf_str(&b, " rip ");
	buf_hex(&b, f->rip);
	buf_str(&b, " rsp ");
	buf_hex(&b, f->rsp);
	buf_str(&b, " cr2 ");
	buf_hex(&b, cr2);
	buf_str(&b, " cs ");
	buf_hex(&b, f->cs);
	buf_str(&b, " rflags ");
	buf_hex(&b, f->rflags);
	buf_str(&b, " vcpu ");
	buf_u64(&b, this_cpu()->id);
	kfail(TG_EXIT_EXCEPTION, msg);
}

/* ---- timer, slot writes, halting -------------------------------------- */

static void arm_timer(struct percpu *pc, u64 deadline)
{
	u64 now, ns;

	if (pc->tsc_deadline) {
		wrmsr(MSR_TSC_DEADLINE, deadline);
		return;
	}
	/* One-shot LAPIC timer, divide by 1: KVM's APIC bus runs at 1 GHz. */
	now = rdtsc();
	ns = deadline > now ? (deadline - now) * 1000000 / pc->tsc_khz + 1 : 1;
	lapic_write(LAPIC_TIMER_INIT, ns > 0xffffffffull ? 0xffffffffu : (u32)ns);
}

static void disarm_timer(struct percpu *pc)
{
	if (pc->tsc_deadline)
		wrmsr(MSR_TSC_DEADLINE, 0);
	else
		lapic_write(LAPIC_TIMER_INIT, 0);
}

/*
 * A wakeup of the task on this vCPU from its halt in sleep_fast, by its
 * timer or a wake IPI (timer_entry / wake_entry in entry.S).  Slot:
 * IN_HARDIRQ while in here, then the woken task's parameters (flags clear:
 * no longer idle).  The task was in a system call, never inside its own
 * slot write: the plain seqcount helpers do.
 */
static inline void wake_task(struct percpu *pc)
{
	u64 tsc = rdtsc(), ns = tsc_ns(tsc);

	tg_irq[pc->id].tsc = tsc;
	pvsched_update_flags(pc->slot, PVSCHED_FLAG_IN_HARDIRQ, 0, ns);
	lapic_write(LAPIC_EOI, 0);
	pc->woken = 1;
	pvsched_clear_wake_hint(pc->slot);
	pvsched_set_task(pc->slot, 0, pc->policy, pc->rt_priority, pc->nice, ns);
}

void timer_work(void)
{
	wake_task(this_cpu());
}

void ipi_work(void)
{
	wake_task(this_cpu());
}

/* A halt's end delivered before the hlt ran (entry.S: PVM ignores STI's shadow). */
void shadow_wake(void)
{
	tg_cpu[this_cpu()->id].shadow_wakes++;
}

/* A halt's end delivered at the sti before it (entry.S, sleep_fast). */
void sti_wake(void)
{
	tg_cpu[this_cpu()->id].sti_wakes++;
}

/*
 * The timer or the wake IPI while the task ran (at CPL3, or in the boot
 * wait's halt at CPL0), not ending sleep_fast's halt.  The same slot writes
 * as wake_task, by critsec.h's rule: they may nest in the task's own
 * PREEMPT_DISABLED mark, and keep that bit.  A wake IPI stays pending for
 * the task's next wait; the timer is re-armed while a SYS_TICK period is set.
 */
void irq_running(u32 ipi, u32 at_hlt)
{
	struct percpu *pc = this_cpu();
	struct pvsched_guest_area *g = pc->slot;
	struct tg_cpu_share *sh = &tg_cpu[pc->id];
	u64 tsc = rdtsc(), ns = tsc_ns(tsc);
	u32 nested, keep = tg_kslot_irq_enter(g, ns, &nested);

	sh->shadow_wakes += at_hlt == 1;
	sh->sti_wakes += at_hlt == 2;
	sh->irqs++;
	if (keep)
		sh->irqs_cs++;
	if (nested)
		sh->nested++;
	tg_irq[pc->id].tsc = tsc;
	lapic_write(LAPIC_EOI, 0);
	if (ipi)
		pc->ipi_pending = 1;
	else if (pc->tick)
		arm_timer(pc, tsc + pc->tick);
	pc->woken = 1;
	pvsched_clear_wake_hint(g);
	tg_kslot_irq_exit(g, keep, pc->policy, pc->rt_priority, pc->nice, ns);
}

/* SYS_TICK: the lock workload's periodic interrupt, as a guest kernel's scheduler tick. */
static void set_tick(struct percpu *pc, u64 period)
{
	pc->tick = period;
	if (period)
		arm_timer(pc, rdtsc() + period);
	else
		disarm_timer(pc);
}

/* SYS_WAKE: the hint first (the host may boost before the IPI lands), then the IPI. */
static void wake_vcpu(u32 target)
{
	if (target >= tg.nr_vcpus)
		return;
	if (tg.pv_state == TG_PV_ACTIVE && target < tg.pv_host_nr_vcpus)
		pvsched_set_wake_hint(&pvsched_slot(tg.pv_shm, target)->guest);
	lapic_write(LAPIC_ICR_HI, target << 24); /* APIC id = vCPU id under pyvmm */
	lapic_write(LAPIC_ICR_LO, ICR_ASSERT | VEC_WAKE);
}

/*
 * Idle, and RT_WAITING when the task sleeping here is RT (it wakes on this
 * vCPU): with F_RT_WAITER the host boosts only such a halt.
 */
static void publish_idle(struct percpu *pc)
{
	u32 flags = PVSCHED_FLAG_IDLE;

	if ((tg.pv_features & PVSCHED_F_RT_WAITER) &&
	    (pc->policy == PVSCHED_POLICY_FIFO || pc->policy == PVSCHED_POLICY_RR))
		flags |= PVSCHED_FLAG_RT_WAITING;
	pvsched_set_task(pc->slot, flags, PVSCHED_POLICY_OTHER, 0, 0, now_ns());
}

/*
 * SYS_SLEEP_UNTIL's C half (entry.S sleep_fast halts right after it and
 * the timer or wake interrupt returns straight to CPL3 from there): slot
 * IDLE, timer armed; 1 when a wake IPI is already pending (no halt).
 * Interrupts are off.
 */
u32 sleep_prepare(u64 deadline, u64 ipi)
{
	struct percpu *pc = this_cpu();

	if (ipi && pc->ipi_pending) {
		pc->ipi_pending = 0;
		return 1; /* woken already: do not halt */
	}
	pc->woken = 0;
	publish_idle(pc);
	arm_timer(pc, deadline);
	return 0;
}

/* Halt (slot IDLE) until the TSC reaches `deadline`; interrupts are off on entry. */
static void sleep_until(struct percpu *pc, u64 deadline)
{
	do {
		pc->woken = 0;
		publish_idle(pc);
		arm_timer(pc, deadline);
		while (!READ_ONCE(pc->woken))
			idle_halt();
	} while (rdtsc() < deadline);
}

static void set_task(struct percpu *pc, s32 policy, u32 prio, s32 nice)
{
	pc->policy = policy;
	pc->rt_priority = prio;
	pc->nice = nice;
	pvsched_clear_wake_hint(pc->slot);
	pvsched_set_task(pc->slot, 0, policy, prio, nice, now_ns());
}

u64 syscall_dispatch(u64 a1, u64 a2, u64 a3, u64 nr)
{
	struct percpu *pc = this_cpu();

	switch (nr) {
	case SYS_WRITE:
		kwrite((const char *)a1, (u32)a2);
		return 0;
	case SYS_SET_TASK:
		set_task(pc, (s32)a1, (u32)a2, (s32)a3);
		return 0;
	case SYS_WAKE:
		wake_vcpu((u32)a1);
		return 0;
	case SYS_TICK:
		set_tick(pc, a1);
		return 0;
	case SYS_EXIT:
		kexit((u32)a1);
	case SYS_HALT:
		publish_idle(pc);
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
		for (;;)
			idle_halt();
	}
	return (u64)-1;
}

/* ---- descriptor tables and LAPIC --------------------------------------- */

static void idt_set(u32 vec, u64 handler, u32 type_attr)
{
	idt[vec * 2] = (handler & 0xffff) | (u64)SEL_KCODE << 16 |
		       (u64)type_attr << 40 | ((handler >> 16) & 0xffff) << 48;
	idt[vec * 2 + 1] = handler >> 32;
}

static void build_idt(void)
{
	u32 v;

	for (v = 0; v < 256; v++)
		idt_set(v, (u64)irq_ignore, 0x8e);
	for (v = 0; v < 32; v++)
		idt_set(v, exc_stubs[v], 0x8e);
	idt_set(VEC_SYSCALL, (u64)syscall_trap, 0xee); /* DPL 3, IF off */
	idt_set(VEC_TIMER, (u64)timer_entry, 0x8e);
	idt_set(VEC_WAKE, (u64)wake_entry, 0x8e);
	idt_set(VEC_SPURIOUS, (u64)irq_spurious, 0x8e);
}

static void load_tables(u32 id)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) gdtr = { sizeof(gdt) - 1, (u64)gdt };
	u64 base = (u64)&tss[id].t;
	u64 limit = sizeof(struct tss) - 1;

	tss[id].t.rsp0 = (u64)&kstacks[id][KSTACK_SIZE];
	tss[id].t.iomap_base = sizeof(struct tss);
	gdt[GDT_TSS0 + 2 * id] = (limit & 0xffff) | (base & 0xffffff) << 16 |
			  (u64)0x89 << 40 | ((limit >> 16) & 0xf) << 48 |
			  ((base >> 24) & 0xff) << 56;
	gdt[GDT_TSS0 + 1 + 2 * id] = base >> 32;
	__asm__ __volatile__(
		"lgdt %0\n\t"
		"pushq %1\n\t"
		"leaq 1f(%%rip), %%rax\n\t"
		"pushq %%rax\n\t"
		"lretq\n"
		"1:\n\t"
		"mov %2, %%eax\n\t"
		"mov %%eax, %%ds\n\t"
		"mov %%eax, %%es\n\t"
		"mov %%eax, %%ss\n\t"
		"xor %%eax, %%eax\n\t"
		"mov %%eax, %%fs\n\t"
		"mov %%eax, %%gs\n\t"
		"ltr %w3"
		:
		: "m"(gdtr), "i"(SEL_KCODE), "i"(SEL_KDATA), "r"(SEL_TSS(id))
		: "rax", "memory");
}

static void load_idt(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };

	__asm__ __volatile__("lidt %0" : : "m"(idtr));
}

static void lapic_init(struct percpu *pc)
{
	u32 a, b, c, d;

	cpuid(1, &a, &b, &c, &d);
	pc->tsc_deadline = !!(c & CPUID_1_ECX_TSC_DEADLINE);
	lapic_write(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
	lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
	lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER,
		    VEC_TIMER | (pc->tsc_deadline ? LVT_TSC_DEADLINE : 0));
}

/* ---- boot -------------------------------------------------------------- */

static void copy_boot_info(const struct pvsched_boot_info *bi)
{
	u64 n = bi->cmdline_len, i;
	const char *src = (const char *)bi->cmdline_gpa;

	tg.nr_vcpus = bi->nr_vcpus;
	tg.mem_size = bi->mem_size;
	tg.tsc_khz = bi->tsc_khz;
	if (n >= sizeof(cmdline_copy))
		kfail(TG_EXIT_BAD_BOOT, "command line too long (4095 bytes at most)");
	if (n && (bi->cmdline_gpa >= bi->mem_size ||
		  bi->cmdline_gpa + n > bi->mem_size))
		kfail(TG_EXIT_BAD_BOOT, "boot_info: command line outside RAM");
	for (i = 0; i < n && src[i]; i++)
		cmdline_copy[i] = src[i];
	cmdline_copy[i] = 0;
}

/* vCPU 0: everything the others wait for. */
static void boot_cpu0(const struct pvsched_boot_info *bi)
{
	u64 end;
	int r;

	if (bi->magic != PVSCHED_BOOT_INFO_MAGIC)
		kfail(TG_EXIT_BAD_BOOT, "boot_info magic mismatch (not booted by the pyvmm boot contract?)");
	copy_boot_info(bi);
	if (!tg.tsc_khz)
		kfail(TG_EXIT_BAD_BOOT, "boot_info: tsc_khz is 0");
	if (!tg.nr_vcpus || tg.nr_vcpus > TG_MAX_VCPUS)
		kfail(TG_EXIT_BAD_BOOT, "boot_info: unsupported number of vCPUs (1-32)");
	kputs("pvsched-testguest: booting\n");
	r = tg_parse_cmdline(cmdline_copy, tg.nr_vcpus, &tg.cfg,
			     tg.cmdline_warning, sizeof(tg.cmdline_warning));
	if (r < 0)
		kfail(TG_EXIT_BAD_CMDLINE, tg.cmdline_warning);
	if (r == 0)
		tg.cmdline_warning[0] = 0;
	/* Quiet the legacy PICs: only the LAPIC timer interrupts us. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	tg.pv_state = TG_PV_DISABLED;
	if (tg.cfg.pvsched_enabled)
		pvsched_probe(pv_area, sizeof(pv_area));
	end = ((u64)_end + 4095) & ~4095ull;
	tg.heap_start = end;
	tg.heap_end = tg.mem_size < 0xc0000000ull ? tg.mem_size : 0xc0000000ull;
	if (tg.heap_end < tg.heap_start)
		tg.heap_end = tg.heap_start;
}

void __attribute__((noreturn)) kmain(u64 id, const struct pvsched_boot_info *bi)
{
	struct percpu *pc = this_cpu();
	u64 khz = bi->tsc_khz ? bi->tsc_khz : 1000000;

	pc->id = (u32)id;
	pc->tsc_khz = khz;
	pc->slot = &pc->dummy.guest;
	ns_mult = (1000000ull << 32) / khz;
	/* Our own page tables: identity, user accessible (the VMM's may lack U). */
	__asm__ __volatile__("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");
	load_tables((u32)id);
	if (id == 0) {
		build_idt();
		WRITE_ONCE(idt_ready, 1);
	} else {
		while (!READ_ONCE(idt_ready))
			cpu_relax();
	}
	load_idt();
	lapic_init(pc);
	if (id == 0) {
		tg.tsc_khz = khz;
		boot_cpu0(bi);
		if (tg.cfg.timer_oneshot)
			pc->tsc_deadline = 0;
		tg.timer_tsc_deadline = pc->tsc_deadline;
	} else {
		__atomic_fetch_add(&tg.nr_online, 1, __ATOMIC_RELEASE);
		/* Wait for vCPU 0's user half to say go, halted, polling every 1 ms. */
		while (!READ_ONCE(tg.boot_go))
			sleep_until(pc, rdtsc() + khz);
		if (tg.cfg.timer_oneshot)
			pc->tsc_deadline = 0;
	}
	/* The timer mode is final now (timer=oneshot may have turned TSC-deadline off). */
	lapic_write(LAPIC_LVT_TIMER, VEC_TIMER | (pc->tsc_deadline ? LVT_TSC_DEADLINE : 0));
	if (tg.pv_state == TG_PV_ACTIVE && id < tg.pv_host_nr_vcpus)
		pc->slot = &pvsched_slot(tg.pv_shm, (u32)id)->guest;
	tg_cpu[id].slot = pc->slot; /* every page is user accessible: CPL3 marks it (critsec.h) */
	enter_user(user_main, &ustacks[id][USTACK_SIZE], id, SEL_UCODE, SEL_UDATA);
}
