/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * One run of the BPF backstop program (pvs_backstop, a syscall program) for one vCPU, through
 * BPF_PROG_TEST_RUN: the native loops' one way to re-read a slot (backstop_loop.c each period,
 * actuator_loop.c at a RECHECK record).  Include <string.h>, <errno.h>, <sys/syscall.h>, <unistd.h>,
 * <linux/bpf.h> and pvsched_policy.h before it.
 */
#ifndef PVSCHED_BACKSTOP_RUN_H
#define PVSCHED_BACKSTOP_RUN_H

/* 0 or -errno. */
static inline int pvsched_backstop_run(int prog_fd, struct pvsched_backstop_ctx *ctx)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.test.prog_fd = prog_fd;
	attr.test.ctx_in = (__u64)(uintptr_t)ctx;
	attr.test.ctx_size_in = sizeof(*ctx);
	return syscall(__NR_bpf, BPF_PROG_TEST_RUN, &attr, sizeof(attr)) < 0 ? -errno : 0;
}

#endif /* PVSCHED_BACKSTOP_RUN_H */
