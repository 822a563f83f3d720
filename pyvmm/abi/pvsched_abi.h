/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * pvsched guest/host ABI: the one definition of everything that crosses a
 * boundary of pvsched (BAR0 register map, shared memory layout, RT ladder,
 * heartbeat; the test guest's boot contract is testguest_boot.h).  Consumers:
 * the test guest, the Linux module, the BPF programs and Python (cffi cdef of
 * `cc -E -P -DPVSCHED_ABI_NO_ASSERTS`).
 *
 * Each consumer provides __u8/__u16/__u32/__u64/__s32 before including it
 * (vmlinux.h in BPF, linux/types.h in the module, stdint in the test guest).
 * Constants are enums because cffi's cdef reads enums, not #define
 * expressions.  The comments here are the reference; the device's side of
 * BAR0 and the negotiation is described in pyvmm/device/README.md.
 */
#ifndef PVSCHED_ABI_H
#define PVSCHED_ABI_H

/* PCI identity of the pvsched device. */
enum pvsched_pci_id {
	PVSCHED_PCI_VENDOR_ID = 0x1234,
	PVSCHED_PCI_DEVICE_ID = 0x7073,
	PVSCHED_PCI_CLASS = 0xff,
	PVSCHED_PCI_REVISION = 1,
	PVSCHED_BAR0_SIZE = 4096,
};

/* BAR0 register offsets (32-bit little-endian accesses only). */
enum pvsched_reg {
	PVSCHED_REG_MAGIC = 0x00,          /* RO */
	PVSCHED_REG_HOST_VERSION = 0x04,   /* RO: major << 16 | minor */
	PVSCHED_REG_HOST_FEATURES = 0x08,  /* RO */
	PVSCHED_REG_GUEST_FEATURES = 0x0c, /* RW */
	PVSCHED_REG_GUEST_VERSION = 0x10,  /* RW */
	PVSCHED_REG_NR_VCPUS = 0x14,       /* RO */
	PVSCHED_REG_SHM_GPA_LO = 0x18,     /* RW */
	PVSCHED_REG_SHM_GPA_HI = 0x1c,     /* RW */
	PVSCHED_REG_SHM_SIZE = 0x20,       /* RW */
	PVSCHED_REG_CONTROL = 0x24,        /* WO */
	PVSCHED_REG_STATUS = 0x28,         /* RO, read as s32 */
};

/* One limit for every side: the BPF vcpus map, the backstop, the guardian, the policy process
 * and the device all hold at most this many vCPUs of one VM. */
enum pvsched_limits {
	PVSCHED_MAX_VCPUS = 256,
};

enum pvsched_magic {
	PVSCHED_MAGIC = 0x43535650, /* "PVSC" little endian */
};

/*
 * The host's RT ladder (SCHED_FIFO/RR priorities), lowest first.  Each rung
 * must preempt every rung below it: the actuator must run while every CPU
 * holds a boosted vCPU, the guardian must restore while the actuator is
 * stuck, and a watchdog must kill whatever livelocks below it.  The BPF
 * policy, the policy process, the guardian (C) and Python read these.
 */
enum pvsched_rt_ladder {
	PVSCHED_RT_PRIO_LIMIT = 30,     /* ceiling of every boost and every translated guest request */
	PVSCHED_CALLER_PRIO = 35,       /* the policy process's Python threads while it runs: each must run to exit */
	PVSCHED_ACTUATOR_PRIO = 40,     /* the policy process's actuator and its backstop loop */
	PVSCHED_BENCH_POLLER_PRIO = 42, /* the benchmark's thread looking for vCPU threads */
	PVSCHED_GUARDIAN_PRIO = 45,     /* the VMM's guardian: restores when the policy process dies or hangs */
	PVSCHED_WATCHDOG_PRIO = 50,     /* the watchdogs (`chrt -f 50 timeout ...`) of tests and benchmarks */
};

enum pvsched_version {
	PVSCHED_VERSION_MAJOR = 1,
	PVSCHED_VERSION_MINOR = 0,
	PVSCHED_VERSION = 0x00010000, /* PVSCHED_VERSION_MAJOR << 16 | MINOR */
};

/*
 * Feature bits: a new behaviour gets a new row, an unknown bit is refused.
 * One row per feature, X(NAME, BIT, OFFERED, "what the guest promises"):
 * the enum below, the device's default offer (OFFERED = 1), the names and
 * descriptions Python shows (build/pvsched_features.json, made from this
 * list by cdef.mk) all come from it, so a new feature is one row here.
 * A guest asks only for the rows it implements (its own mask).
 */
#define PVSCHED_FEATURES(X)                                                                     \
	X(CRITICAL_SECTIONS, 0, 1, "the guest marks irq, softirq, nmi and preempt-off sections")   \
	X(TASK_PARAMS, 1, 1, "the guest publishes the running task's policy, RT priority and nice") \
	X(HOST_FEEDBACK, 2, 1, "the host writes what it did into the slot's host area")             \
	X(WAKE_HINT, 3, 1, "a vCPU waking an RT task on another vCPU sets that slot's wake_hint")    \
	X(RT_WAITER, 4, 1, "IDLE comes with RT_WAITING while an RT task sleeps on the vCPU, so the host boosts a halt only then") \
	/* every row ends with a backslash: a new row touches no other line */

#define PVSCHED_F_BIT_(name, bit, offered, doc) PVSCHED_F_##name = 1 << (bit),
#define PVSCHED_F_ALL_(name, bit, offered, doc) | (1 << (bit))
#define PVSCHED_F_OFFER_(name, bit, offered, doc) | ((offered) << (bit))
enum pvsched_feature {
	PVSCHED_FEATURES(PVSCHED_F_BIT_)
};

enum pvsched_feature_mask {
	PVSCHED_F_ALL = 0 PVSCHED_FEATURES(PVSCHED_F_ALL_),           /* every feature this header defines */
	PVSCHED_F_DEFAULT_OFFER = 0 PVSCHED_FEATURES(PVSCHED_F_OFFER_), /* what the device offers by default */
};
#undef PVSCHED_F_BIT_
#undef PVSCHED_F_ALL_
#undef PVSCHED_F_OFFER_

enum pvsched_control {
	PVSCHED_CTRL_ENABLE = 1,
	PVSCHED_CTRL_DISABLE = 2,
	PVSCHED_CTRL_RESET = 3,
};

enum pvsched_status {
	PVSCHED_STATUS_IDLE = 0,
	PVSCHED_STATUS_ACTIVE = 1,
	PVSCHED_STATUS_BAD_GPA = -1,
	PVSCHED_STATUS_TOO_SMALL = -2,
	PVSCHED_STATUS_BAD_VERSION = -3,
	PVSCHED_STATUS_BAD_FEATURE = -4,
	PVSCHED_STATUS_BUSY = -5,
	PVSCHED_STATUS_AGAIN = -6,   /* ENABLE refused: registrations come too often (rate limit); try again later */
};

/* Guest slot flags (struct pvsched_guest_area.flags). */
enum pvsched_slot_flag {
	PVSCHED_FLAG_IN_NMI = 1 << 0,
	PVSCHED_FLAG_IN_HARDIRQ = 1 << 1,
	PVSCHED_FLAG_IN_SOFTIRQ = 1 << 2,
	PVSCHED_FLAG_PREEMPT_DISABLED = 1 << 3,
	PVSCHED_FLAG_IDLE = 1 << 4,
	PVSCHED_FLAG_RT_WAITING = 1 << 5, /* with IDLE: an RT task sleeps here (F_RT_WAITER) */
	PVSCHED_FLAGS_CRITICAL = 0xf, /* NMI | HARDIRQ | SOFTIRQ | PREEMPT_DISABLED */
	PVSCHED_FLAGS_ALL = 0x3f,
};

/* Linux SCHED_* numbers as they appear in a slot (prefixed: no clash). */
enum pvsched_policy {
	PVSCHED_POLICY_OTHER = 0,
	PVSCHED_POLICY_FIFO = 1,
	PVSCHED_POLICY_RR = 2,
	PVSCHED_POLICY_BATCH = 3,
	PVSCHED_POLICY_IDLE = 5,
	PVSCHED_POLICY_DEADLINE = 6,
	PVSCHED_POLICY_EXT = 7,
};

/* Host-side state of a vCPU (struct pvsched_host_area.state). */
enum pvsched_host_state {
	PVSCHED_STATE_NORMAL = 0,
	PVSCHED_STATE_BOOSTED = 1,
	PVSCHED_STATE_THROTTLED = 2,
};

enum pvsched_layout {
	PVSCHED_SHM_HEADER_SIZE = 64,
	PVSCHED_SLOT_SIZE = 128,
	PVSCHED_SLOT_OFFSET = 64,
	PVSCHED_HOST_AREA_OFFSET = 64, /* within a slot */
	PVSCHED_PAGE_SIZE = 4096,
};

/* Shared area header, written by the guest before ENABLE. */
struct pvsched_shm_header {
	__u32 magic;       /* PVSCHED_MAGIC */
	__u32 version;     /* negotiated version */
	__u32 features;    /* negotiated features */
	__u32 nr_vcpus;
	__u32 slot_size;   /* PVSCHED_SLOT_SIZE */
	__u32 slot_offset; /* PVSCHED_SLOT_OFFSET */
	__u32 reserved[10];
};

/* Written only by the owner vCPU (wake_hint: by any vCPU, atomically). */
struct pvsched_guest_area {
	__u32 seq;         /* seqcount: odd while the owner writes */
	__u32 flags;       /* enum pvsched_slot_flag */
	__s32 policy;      /* enum pvsched_policy of the task running now */
	__u32 rt_priority; /* 1-99 for FIFO/RR, else 0 */
	__s32 nice;        /* -20..19 */
	__u32 wake_hint;   /* outside the seqcount; cleared by the owner */
	__u64 guest_ns;    /* guest clock at the last write, tracing only */
	__u32 reserved[8];
};

/* Written only by the host; the guest may read it. */
struct pvsched_host_area {
	__u32 seq;
	__u32 state;       /* enum pvsched_host_state */
	__s32 policy;      /* applied */
	__u32 rt_priority;
	__s32 nice;
	__u32 reserved0;
	__u64 boosts;
	__u64 throttles;
	__u64 boosted_ns;
	__u32 reserved[4];
};

struct pvsched_slot {
	struct pvsched_guest_area guest;
	struct pvsched_host_area host;
};

/*
 * The heartbeat page between the VMM's guardian and the policy process: a
 * sealed memfd the VMM creates and the policy process maps.  Not guest memory,
 * so a hostile guest cannot keep a hung policy process "alive".
 */
struct pvsched_heartbeat {
	__u64 beats;        /* +1 by the policy process's backstop loop while its actuator keeps up */
	__u64 reserved[7];
};

#ifndef PVSCHED_ABI_NO_ASSERTS
_Static_assert(sizeof(struct pvsched_shm_header) == PVSCHED_SHM_HEADER_SIZE,
	       "shm header is 64 bytes");
_Static_assert(sizeof(struct pvsched_guest_area) == 64, "guest area");
_Static_assert(sizeof(struct pvsched_host_area) == 64, "host area");
_Static_assert(sizeof(struct pvsched_slot) == PVSCHED_SLOT_SIZE, "slot");
_Static_assert(sizeof(struct pvsched_heartbeat) == 64, "heartbeat");
#endif

#endif /* PVSCHED_ABI_H */
