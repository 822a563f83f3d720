/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * runqlat: host wake-to-run latency of chosen threads (the benchmark's vCPU
 * threads).  Shared by runqlat.bpf.c and its Python loader (pyvmm/bench/runqlat.py,
 * which feeds cffi's cdef build/runqlat.cdef: this header through pyvmm/abi/cdef.mk
 * with -DRUNQLAT_NO_ASSERTS, made at build time).
 * Consumers provide __u32/__u64 first (vmlinux.h in BPF, a prologue in Python).
 */
#ifndef RUNQLAT_H
#define RUNQLAT_H

/*
 * Log-linear histogram (like HdrHistogram): 1-us buckets below
 * RUNQLAT_LINEAR_US, then each power of two [2^e, 2^(e+1)) us split in
 * 2^RUNQLAT_SUB_BITS equal buckets (1.6% wide), up to 2^(RUNQLAT_MAX_EXP+1) us.
 */
enum runqlat_const {
	RUNQLAT_LINEAR_BITS = 10,
	RUNQLAT_LINEAR_US = 1024,  /* 1 << RUNQLAT_LINEAR_BITS */
	RUNQLAT_SUB_BITS = 6,
	RUNQLAT_SUBS = 64,         /* 1 << RUNQLAT_SUB_BITS */
	RUNQLAT_MAX_EXP = 30,      /* about 18 minutes: anything longer lands in the last bucket */
	RUNQLAT_NR_BUCKETS = 2368, /* RUNQLAT_LINEAR_US + (RUNQLAT_MAX_EXP - RUNQLAT_LINEAR_BITS + 1) * RUNQLAT_SUBS */
	RUNQLAT_MAX_TIDS = 256,
};

/* Why the thread was waiting on a runqueue. */
enum runqlat_kind {
	RUNQLAT_WAKEUP = 0,  /* woken (e.g. a halted vCPU's timer fired) until it ran */
	RUNQLAT_PREEMPT = 1, /* switched out while runnable until it ran again */
	RUNQLAT_NR_KINDS = 2,
};

/* One per-CPU value per kind; userspace adds the CPUs up. */
struct runqlat_hist {
	__u64 count;
	__u64 sum_ns;
	__u64 max_ns;
	__u64 buckets[RUNQLAT_NR_BUCKETS];
};

/* Value of the in-flight map: when the wait began and why. */
struct runqlat_start {
	__u64 ts_ns;
	__u32 kind;
	__u32 pad;
};

#ifndef RUNQLAT_NO_ASSERTS
_Static_assert(RUNQLAT_LINEAR_US == 1 << RUNQLAT_LINEAR_BITS && RUNQLAT_SUBS == 1 << RUNQLAT_SUB_BITS, "bits");
_Static_assert(RUNQLAT_NR_BUCKETS ==
	       RUNQLAT_LINEAR_US + (RUNQLAT_MAX_EXP - RUNQLAT_LINEAR_BITS + 1) * RUNQLAT_SUBS, "bucket count");
_Static_assert(sizeof(struct runqlat_hist) == 8 * (3 + RUNQLAT_NR_BUCKETS), "hist layout");
_Static_assert(sizeof(struct runqlat_start) == 16, "start layout");
#endif

#endif /* RUNQLAT_H */
