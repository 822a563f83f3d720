/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * sched_setattr and sched_getattr for the native RT threads (the VMM's guardian, the policy's
 * actuator loop).  glibc before 2.41 has no wrappers, and <linux/sched/types.h> clashes with
 * glibc's <sched.h>, so the uapi struct (SCHED_ATTR_SIZE_VER0) is declared here, once.
 * Include <stdint.h>, <errno.h>, <string.h>, <sys/syscall.h> and <unistd.h> before it.
 */
#ifndef PVSCHED_SCHED_SYSCALLS_H
#define PVSCHED_SCHED_SYSCALLS_H

struct kernel_sched_attr {
	uint32_t size;
	uint32_t sched_policy;
	uint64_t sched_flags;
	int32_t sched_nice;
	uint32_t sched_priority;
	uint64_t sched_runtime;
	uint64_t sched_deadline;
	uint64_t sched_period;
};
_Static_assert(sizeof(struct kernel_sched_attr) == 48, "SCHED_ATTR_SIZE_VER0");

/* Thread `tid` to (policy, priority, nice); nice is kept for RT policies, so that restoring is exact.  0 or -errno. */
static inline int pvsched_sched_setattr(int tid, uint32_t policy, uint32_t priority, int32_t nice)
{
	struct kernel_sched_attr a;

	memset(&a, 0, sizeof(a));
	a.size = sizeof(a);
	a.sched_policy = policy;
	a.sched_priority = priority;
	a.sched_nice = nice;
	return syscall(SYS_sched_setattr, tid, &a, 0) < 0 ? -errno : 0;
}

/* Thread `tid`'s attributes into `out`.  0 or -errno. */
static inline int pvsched_sched_getattr(int tid, struct kernel_sched_attr *out)
{
	return syscall(SYS_sched_getattr, tid, out, sizeof(*out), 0) < 0 ? -errno : 0;
}

#endif /* PVSCHED_SCHED_SYSCALLS_H */
