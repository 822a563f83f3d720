/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Test-guest entry (boot contract: 64-bit mode, CPL0, RDI = vCPU id,
 * RSI = boot_info GPA), identity page tables with the U bit, and the
 * assembly halves of exceptions, stray interrupts and system calls.
 * Everything here runs at CPL0, which KVM's PVM backend emulates: few
 * instructions per path.
 */
#define KSTACK_SHIFT 14 /* 16 KiB per vCPU, must match kernel.c */
#define MAX_VCPUS 32    /* TG_MAX_VCPUS */

	.section .text.entry, "ax"
	.globl _start
	.code64
_start:
	cli
	cmp	$MAX_VCPUS, %rdi
	jae	2f
	/* rsp = kstacks + (id + 1) * KSTACK: the top of this vCPU's stack. */
	lea	1(%rdi), %rax
	shl	$KSTACK_SHIFT, %rax
	lea	kstacks(%rip), %rsp
	add	%rax, %rsp
	xor	%ebp, %ebp
	call	kmain
2:	hlt
	jmp	2b

	.text
/* enter_user(rip, rsp, arg, cs, ss): iretq to CPL3 with IF=1; never returns. */
	.globl enter_user
enter_user:
	pushq	%r8		/* SS */
	pushq	%rsi		/* RSP */
	pushq	$0x202		/* RFLAGS: IF */
	pushq	%rcx		/* CS */
	pushq	%rdi		/* RIP */
	mov	%rdx, %rdi
	xor	%esi, %esi
	xor	%edx, %edx
	xor	%ecx, %ecx
	xor	%r8d, %r8d
	xor	%eax, %eax
	iretq

#define SYS_SLEEP_UNTIL 3 /* enum tg_syscall */

/*
 * System calls are `int3` from CPL3 (vector 3, a DPL-3 interrupt gate):
 * KVM's PVM backend answers `int $0x80` with #UD and runs `syscall`
 * in its own supervisor mode rather than at CPL0, while exceptions reach
 * the IDT as on hardware.  rax = number, rdi/rsi/rdx = arguments, result
 * in rax; other registers are preserved, except by SYS_SLEEP_UNTIL.
 */
	.globl syscall_trap
syscall_trap:
	cmp	$SYS_SLEEP_UNTIL, %eax
	je	sleep_fast
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	sub	$8, %rsp	/* 16-byte alignment for the C call */
	mov	%rax, %rcx
	call	syscall_dispatch
	add	$8, %rsp
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	iretq

/*
 * SYS_SLEEP_UNTIL(rdi = TSC deadline), the probe's hot path, kept short
 * because every CPL0 instruction is emulated under PVM: the caller treats all
 * caller-saved registers as clobbered, so nothing is saved; the timer
 * interrupt that ends the halt returns from timer_entry straight to CPL3
 * through this int3 frame.  Any other interrupt just halts again.
 *
 * KVM's PVM backend ignores STI's interrupt shadow (its
 * set_interrupt_shadow does nothing in PVM mode): a wake-up already pending
 * at the sti (the deadline passed while the vCPU was preempted before it)
 * is delivered with the hlt not yet run.  Returning to the hlt would halt
 * with no timer armed, for good, so the wake entries treat an interrupt at
 * sleep_hlt (and at idle_hlt, below) as the end of the halt.  One that
 * names the sti itself as where it came (sleep_sti, idle_halt) is treated
 * the same: interrupts are off before that sti, so it can only be one that
 * PVM delivered while running the sti, and returning there halts for good
 * too (a lost wake-up, 2026-12-07: a vCPU halted at idle_hlt, IF=1, its
 * timer fired and acknowledged, nothing pending).
 */
sleep_fast:
	sub	$8, %rsp	/* the int3 frame sits at 8(%rsp) while halted */
	call	sleep_prepare
	test	%eax, %eax
	jnz	3f		/* a wake IPI was pending: back at once */
1:
sleep_sti:
	sti
sleep_hlt:
	hlt
sleep_resume:
	cli
	jmp	1b
3:	add	$8, %rsp
	iretq

/*
 * The LAPIC timer and the wake IPI: when they end sleep_fast's halt,
 * return straight to CPL3 through the int3 frame (C half \work); one
 * that came before the hlt ran (see sleep_fast) does the same, counted
 * (shadow_wake, or sti_wake when it names the sti).  Otherwise save the
 * caller-saved registers around irq_running(ipi, at_hlt), which may have
 * interrupted the task's own slot write, and return where we were, past
 * idle_halt's hlt if it came before that ran (at_hlt 1 at the hlt, 2 at
 * the sti).  The first instructions are the probe's hot path, each one
 * emulated: the common cases (the end of sleep_fast's halt, an interrupt
 * of the task at CPL3) run no more of them than before.
 */
.macro WAKE_ENTRY name, work, ipi
	.globl \name
\name:
	cmpq	$sleep_resume, (%rsp)
	jne	6f
	mov	24(%rsp), %rsp	/* drop this frame: back to sleep_fast's stack */
4:	call	\work
	add	$8, %rsp
	iretq			/* the int3 frame: to the task, woken */
6:	testb	$3, 8(%rsp)	/* from CPL3 (the interrupted CS): not at a halt */
	jnz	2f
	cmpq	$sleep_hlt, (%rsp)
	je	7f
	cmpq	$sleep_sti, (%rsp)
	jne	2f
	mov	24(%rsp), %rsp
	call	sti_wake
	jmp	4b
7:	mov	24(%rsp), %rsp
	call	shadow_wake	/* clobbers only what sleep_fast's caller gave up */
	jmp	4b
2:	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	xor	%esi, %esi
	testb	$3, 80(%rsp)	/* the interrupted CS, above the nine saved registers and RIP */
	jnz	5f
	inc	%esi
	cmpq	$idle_hlt, 72(%rsp)	/* the interrupted RIP */
	je	8f
	inc	%esi
	cmpq	$idle_halt, 72(%rsp)	/* at idle_halt's sti itself */
	je	8f
	xor	%esi, %esi
	jmp	5f
8:	movq	$idle_resume, 72(%rsp)	/* before idle_halt's hlt ran: resume after it */
5:	mov	$\ipi, %edi
	call	irq_running
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	iretq
.endm

WAKE_ENTRY timer_entry, timer_work, 0
WAKE_ENTRY wake_entry, ipi_work, 1

/*
 * idle_halt(): sti; hlt; cli, for the kernel's own waits (they loop on a
 * flag the wake entries set).  A timer or wake IPI delivered between the
 * sti and the hlt, or at the sti (PVM: see sleep_fast), resumes past the hlt.
 */
	.globl idle_halt
idle_halt:
	sti
idle_hlt:
	hlt
idle_resume:
	cli
	ret

/* Any vector nobody asked for: acknowledge at the LAPIC and go on. */
	.globl irq_ignore
irq_ignore:
	push	%rax
	mov	$0xfee000b0, %eax
	movl	$0, (%rax)
	pop	%rax
	iretq

/* The LAPIC spurious vector: no EOI. */
	.globl irq_spurious
irq_spurious:
	iretq

/* Exceptions: uniform frame (vector, error code, iret frame), then C. */
.macro EXC n, haserr
exc\n:
	.if \haserr == 0
	pushq	$0
	.endif
	pushq	$\n
	jmp	exc_common
.endm

EXC 0, 0
EXC 1, 0
EXC 2, 0
EXC 3, 0
EXC 4, 0
EXC 5, 0
EXC 6, 0
EXC 7, 0
EXC 8, 1
EXC 9, 0
EXC 10, 1
EXC 11, 1
EXC 12, 1
EXC 13, 1
EXC 14, 1
EXC 15, 0
EXC 16, 0
EXC 17, 1
EXC 18, 0
EXC 19, 0
EXC 20, 0
EXC 21, 1
EXC 22, 0
EXC 23, 0
EXC 24, 0
EXC 25, 0
EXC 26, 0
EXC 27, 0
EXC 28, 0
EXC 29, 1
EXC 30, 1
EXC 31, 0

exc_common:
	mov	%rsp, %rdi
	and	$-16, %rsp
	call	exception_handler
3:	hlt
	jmp	3b

	.section .rodata
	.globl exc_stubs
	.balign 8
exc_stubs:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad exc\n
	.endr

/*
 * Identity map of the low 4 GiB with 2 MiB pages, every page user
 * accessible (P|RW|US|PS); the top GiB (PCI window, IOAPIC, LAPIC)
 * uncached.  Built by the assembler: no CPL0 loop at boot.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4
pml4:
	.quad	pdpt + 0x7
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x7
	.quad	pd + 0x1007
	.quad	pd + 0x2007
	.quad	pd + 0x3007
	.fill	508, 8, 0
pd:
	.set	pa, 0
	.rept	1536
	.quad	pa + 0x87
	.set	pa, pa + 0x200000
	.endr
	.rept	512
	.quad	pa + 0x9f
	.set	pa, pa + 0x200000
	.endr
	.section .note.GNU-stack, "", @progbits
