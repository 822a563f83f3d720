// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The guardian: one native thread in the VMM that undoes the policy process's boosts when that
 * process dies or hangs, without Python.
 *
 * Why native: with boosted vCPU threads on every CPU, whatever thread of the VMM holds the GIL
 * may be a starved SCHED_OTHER thread, so a restore written in Python waits for the fair
 * server (~1 s) however high its own priority. This thread never takes the GIL. It runs at
 * SCHED_FIFO PVSCHED_GUARDIAN_PRIO (above every boost and the actuator, below the watchdogs),
 * locks its own pages, blocks all signals, and sleeps in poll() on:
 *   - a pidfd of the policy process: readable once it is gone;
 *   - a PIDFD_THREAD pidfd of each of its threads (Linux 6.9+): readable once that thread has
 *     exited (the list is read again from /proc when its thread count changes);
 *   - an eventfd: stop requests;
 * with a timeout of period_ms.
 *
 * Dying, not dead: a killed policy process is not gone until its last thread has closed its BPF
 * links, and that waits for an RCU grace period (a thread in D state in
 * synchronize_rcu_expedited) which the boosted vCPUs themselves hold up, for up to a second. So the
 * guardian acts when every thread of the process is exiting (PF_EXITING in /proc/<pid>/task/
 * <tid>/stat: set by each thread at the start of do_exit, after its last system call, so no
 * sched_setattr of the policy can land later). It looks when any of its threads has exited
 * (the first one to finish), and at every timeout if the main thread's stat shows PF_EXITING.
 *
 * Hung, not dying: at every wake-up it reads the heartbeat page (a sealed memfd the policy
 * process's backstop loop increments at least every 100 ms while its actuator keeps up with the
 * ring buffer, see pyvmm/policy/backstop_loop.c). A heartbeat seen moving that then stays still
 * for stale_ms means a hung (deadlocked, stopped) policy process: the guardian SIGKILLs it
 * through the pidfd and restores at once, and again when it is dying and when it is gone.
 * The Python supervisor then sees the death as usual; its own restore is the second line
 * (every restore is idempotent).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "guardian.h"
#include <linux/types.h> /* the ABI header's __u32 */
#include "pvsched_abi.h"
#include "sched_syscalls.h"

#define HEARTBEAT_SIZE 4096
#define STACK_SIZE (64 * 1024)
#define PIDFD_THREAD O_EXCL      /* <linux/pidfd.h>, Linux 6.9: a pidfd for one thread */
#define FAST_MS 1                /* poll timeout once one of its threads exits before the others */
#define FAST_WINDOW_NS 50000000  /* ... for this long (a thread that ends alone must not cost more) */
#define SUSPECT_MS 5             /* poll timeout after a thread's exit until the heartbeat moves again */
#define LATE_NS 20000000LL       /* a poll() this much past its timeout: the guardian itself did not run */
#define PF_EXITING 0x00000004    /* <linux/sched.h>: the task is in do_exit (field 9 of /proc/.../stat) */

_Static_assert((int)PVSCHED_GUARDIAN_MAX_THREADS == (int)PVSCHED_MAX_VCPUS, "one vCPU limit (pvsched_abi.h)");

struct thread_attr {
	int32_t tid, policy, priority, nice;
};

#define MAX_WATCHED 16  /* threads of the policy process with a pidfd (it has 2-3; more are seen by timeouts) */

struct watched_thread {
	int tid;
	int fd;        /* PIDFD_THREAD pidfd; -1 once it fired (or could not be opened): not polled */
};

struct pvsched_guardian {
	pthread_mutex_t lock;          /* priority inheritance: a starved holder gets the guardian's priority */
	struct pvsched_guardian_info info;
	struct thread_attr threads[PVSCHED_GUARDIAN_MAX_THREADS];
	int nr_threads;
	int hb_fd;                     /* the memfd; the policy process gets a copy */
	volatile struct pvsched_heartbeat *hb;
	int pid;                       /* the policy process, pinned by pidfd until we close it */
	int pidfd;
	struct watched_thread watched[MAX_WATCHED];
	int nr_watched;
	int nr_threads_seen;           /* the policy process's thread count when `watched` was made */
	int stat_fd;                   /* /proc/<pid>/stat, read again with pread at every wake-up */
	int stopfd;
	int period_ms;
	int64_t stale_ns;
	int disarmed;                  /* atomic: clean shutdown, no more stale kills */
	int started;
	pthread_t thread;
	pid_t thread_tid;              /* atomic: the guardian thread's TID, 0 until it runs */
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);  /* Python's time.monotonic() clock */
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct pvsched_guardian *pvsched_guardian_new(void)
{
	struct pvsched_guardian *g;
	pthread_mutexattr_t ma;
	void *hb;

	/* Page-aligned and separately mapped, so the thread can lock exactly its own state. */
	g = mmap(NULL, sizeof(*g), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (g == MAP_FAILED)
		return NULL;
	memset(g, 0, sizeof(*g));
	g->pidfd = g->stopfd = g->hb_fd = g->stat_fd = -1;
	pthread_mutexattr_init(&ma);
	pthread_mutexattr_setprotocol(&ma, PTHREAD_PRIO_INHERIT);
	pthread_mutex_init(&g->lock, &ma);
	pthread_mutexattr_destroy(&ma);

	g->hb_fd = memfd_create("pvsched-heartbeat", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (g->hb_fd < 0)
		goto out_free;
	if (ftruncate(g->hb_fd, HEARTBEAT_SIZE) < 0)
		goto out_close;
	/* Sealed size: the policy process (which writes the page) cannot truncate it under us (SIGBUS). */
	if (fcntl(g->hb_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
		goto out_close;
	hb = mmap(NULL, HEARTBEAT_SIZE, PROT_READ, MAP_SHARED, g->hb_fd, 0);
	if (hb == MAP_FAILED)
		goto out_close;
	g->hb = hb;
	g->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (g->stopfd < 0)
		goto out_unmap;
	return g;

out_unmap:
	munmap(hb, HEARTBEAT_SIZE);
out_close:
	close(g->hb_fd);
out_free:
	munmap(g, sizeof(*g));
	return NULL;
}

int pvsched_guardian_heartbeat_fd(struct pvsched_guardian *g)
{
	return g->hb_fd;
}

int pvsched_guardian_set_threads(struct pvsched_guardian *g, int n, const int32_t *tids, const int32_t *policies,
				 const int32_t *priorities, const int32_t *nices)
{
	if (n < 0 || n > PVSCHED_GUARDIAN_MAX_THREADS)
		return -EINVAL;
	pthread_mutex_lock(&g->lock);
	for (int i = 0; i < n; i++)
		g->threads[i] = (struct thread_attr){ tids[i], policies[i], priorities[i], nices[i] };
	g->nr_threads = n;
	g->info.nr_threads = n;
	pthread_mutex_unlock(&g->lock);
	return 0;
}

/* Every guarded thread back to its recorded attributes; lock held. Returns how many were set. */
static int restore_locked(struct pvsched_guardian *g)
{
	int n = 0;

	for (int i = 0; i < g->nr_threads; i++) {
		const struct thread_attr *t = &g->threads[i];
		int rc;

		/* Only a thread of this process: a vCPU thread that ended may have left its TID to another
		 * process by now (pid_max 32768, a forking host load).  tgkill with signal 0 checks that
		 * the TID is in our thread group and sends nothing. */
		if (syscall(SYS_tgkill, getpid(), t->tid, 0) != 0)
			continue;
		rc = pvsched_sched_setattr(t->tid, (uint32_t)t->policy, (uint32_t)t->priority, t->nice);
		if (rc == 0) {
			n++;
		} else if (rc != -ESRCH) {  /* a thread that already ended needs nothing */
			g->info.errors++;
			g->info.last_errno = -rc;
		}
	}
	g->info.restores++;
	return n;
}

int pvsched_guardian_restore(struct pvsched_guardian *g)
{
	int n;

	pthread_mutex_lock(&g->lock);
	n = restore_locked(g);
	pthread_mutex_unlock(&g->lock);
	return n;
}

/* The event (death or stale kill) happened at `t`: restore and record it (first time only). */
static void on_event(struct pvsched_guardian *g, int64_t t, int cause, int64_t silent_ns)
{
	int n;

	pthread_mutex_lock(&g->lock);
	n = restore_locked(g);
	if (g->info.cause == PVSCHED_GUARDIAN_CAUSE_NONE) {
		g->info.cause = cause;
		g->info.event_ns = t;
		g->info.restore_ns = now_ns();
		g->info.restored = n;
		g->info.silent_ms = silent_ns / 1000000;
	}
	pthread_mutex_unlock(&g->lock);
}

struct own_object {
	uintptr_t base;  /* load address of this library */
	int failed;
};

static int lock_own_code(struct dl_phdr_info *info, size_t size, void *arg)
{
	struct own_object *me = arg;
	long page = sysconf(_SC_PAGESIZE);

	(void)size;
	if (info->dlpi_addr != me->base)
		return 0;
	for (int i = 0; i < info->dlpi_phnum; i++) {
		const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
		uintptr_t start, end;

		if (ph->p_type != PT_LOAD)
			continue;
		start = (info->dlpi_addr + ph->p_vaddr) & ~(uintptr_t)(page - 1);
		end = info->dlpi_addr + ph->p_vaddr + ph->p_memsz;
		if (mlock((void *)start, end - start) < 0)
			me->failed = 1;
	}
	return 1;
}

/* Lock what the loop touches (not mlockall: that would pin all of guest RAM). 1 if all of it. */
static int lock_memory(struct pvsched_guardian *g)
{
	struct own_object me = { 0, 0 };
	pthread_attr_t attr;
	void *stack;
	size_t stack_size;
	Dl_info dl;
	int ok = 1;

	if (mlock(g, sizeof(*g)) < 0 || mlock((void *)g->hb, HEARTBEAT_SIZE) < 0)
		ok = 0;
	if (pthread_getattr_np(pthread_self(), &attr) == 0) {
		if (pthread_attr_getstack(&attr, &stack, &stack_size) != 0 || mlock(stack, stack_size) < 0)
			ok = 0;
		pthread_attr_destroy(&attr);
	} else {
		ok = 0;
	}
	if (dladdr((void *)pvsched_guardian_new, &dl) != 0 && dl.dli_fbase) {
		me.base = (uintptr_t)dl.dli_fbase;
		if (!dl_iterate_phdr(lock_own_code, &me) || me.failed)
			ok = 0;
	} else {
		ok = 0;
	}
	return ok;
}

/* Task flags (field 9) from the text of a /proc stat file, 0 if it does not parse; num_threads (field 20). */
static unsigned int stat_flags(const char *buf, int *nr_threads)
{
	const char *p = strrchr(buf, ')');  /* comm may contain anything, even ')' */
	unsigned int flags = 0;
	int n = 0;

	if (!p || sscanf(p + 1, " %*c %*s %*s %*s %*s %*s %u %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %d",
			 &flags, &n) < 1)
		return 0;
	if (nr_threads)
		*nr_threads = n;
	return flags;
}

static int read_text(int fd, char *buf, size_t size)
{
	ssize_t n = pread(fd, buf, size - 1, 0);

	if (n <= 0)
		return -1;
	buf[n] = 0;
	return 0;
}

/* 1 if the main thread is in do_exit (or its stat is unreadable: gone); the process's thread count. */
static int leader_exiting(struct pvsched_guardian *g, int *nr_threads)
{
	char buf[512];

	*nr_threads = 0;
	if (g->stat_fd < 0)
		return 0;
	if (read_text(g->stat_fd, buf, sizeof(buf)) < 0)
		return 1;
	return !!(stat_flags(buf, nr_threads) & PF_EXITING);
}

struct linux_dirent64 {  /* getdents64(2): no opendir, so no malloc on this thread */
	uint64_t d_ino;
	int64_t d_off;
	unsigned short reclen;
	unsigned char d_type;
	char name[];
};

/* 1 if every thread of the policy process is in do_exit or gone: it can no longer change a thread. */
static int all_exiting(struct pvsched_guardian *g)
{
	char path[64], buf[512], dents[4096];
	int dir, all = 1;
	long n;

	snprintf(path, sizeof(path), "/proc/%d/task", g->pid);
	dir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dir < 0)
		return 1;  /* no task directory: reaped (the pidfd says so too) */
	while (all && (n = syscall(SYS_getdents64, dir, dents, sizeof(dents))) > 0) {
		for (long off = 0; off < n;) {
			struct linux_dirent64 *d = (void *)(dents + off);
			int fd;

			off += d->reclen;
			if (d->name[0] < '0' || d->name[0] > '9')
				continue;
			snprintf(path, sizeof(path), "%s/stat", d->name);
			fd = openat(dir, path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;  /* that thread is gone */
			if (read_text(fd, buf, sizeof(buf)) == 0 && !(stat_flags(buf, NULL) & PF_EXITING))
				all = 0;
			close(fd);
			if (!all)
				break;
		}
	}
	close(dir);
	return all;
}

/*
 * Rebuild the list of the policy process's threads to poll: keep what is known (a fired pidfd
 * stays at -1, so a zombie main thread is not polled again), open a PIDFD_THREAD pidfd for
 * new ones, drop those no longer listed. Our pidfd pins the process, so its task directory is
 * its own; a thread that exits meanwhile is simply not found or reports at once.
 */
static void watch_threads(struct pvsched_guardian *g)
{
	struct watched_thread next[MAX_WATCHED];
	char path[64], dents[4096];
	int nr = 0, dir, keep[MAX_WATCHED] = { 0 };
	long n;

	snprintf(path, sizeof(path), "/proc/%d/task", g->pid);
	dir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dir < 0)
		return;
	while (nr < MAX_WATCHED && (n = syscall(SYS_getdents64, dir, dents, sizeof(dents))) > 0) {
		for (long off = 0; off < n && nr < MAX_WATCHED;) {
			struct linux_dirent64 *d = (void *)(dents + off);
			int tid, i;

			off += d->reclen;
			if (d->name[0] < '0' || d->name[0] > '9')
				continue;
			tid = atoi(d->name);
			for (i = 0; i < g->nr_watched && g->watched[i].tid != tid; i++)
				;
			if (i < g->nr_watched) {
				keep[i] = 1;
				next[nr++] = g->watched[i];
			} else {
				next[nr++] = (struct watched_thread){ tid, (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD) };
			}
		}
	}
	close(dir);
	for (int i = 0; i < g->nr_watched; i++)
		if (!keep[i] && g->watched[i].fd >= 0)
			close(g->watched[i].fd);
	memcpy(g->watched, next, sizeof(next[0]) * nr);
	g->nr_watched = nr;
}

static void close_fds(struct pvsched_guardian *g)
{
	int *fds[] = { &g->pidfd, &g->stat_fd };

	for (unsigned int i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
		if (*fds[i] >= 0)
			close(*fds[i]);
		*fds[i] = -1;
	}
	for (int i = 0; i < g->nr_watched; i++)
		if (g->watched[i].fd >= 0)
			close(g->watched[i].fd);
	g->nr_watched = 0;
}

static void set_state(struct pvsched_guardian *g, int state)
{
	pthread_mutex_lock(&g->lock);
	g->info.state = state;
	pthread_mutex_unlock(&g->lock);
}

/*
 * How soon to look again after a thread of the policy process exited while the others did not
 * (yet): in a group exit the others follow within microseconds, so look again soon, for a
 * while; then keep looking every SUSPECT_MS until the heartbeat moves.  A thread that ends
 * while the heartbeat moves on ended alone; one that ends while the beat stands still may be
 * the first of a death whose other threads are still running.
 */
enum exit_watch {
	EXIT_QUIET = 0,    /* no such exit pending: wake every period_ms */
	EXIT_FAST = 1,     /* one was seen: every FAST_MS until fast_until */
	EXIT_SUSPECT = 2,  /* then every SUSPECT_MS until the heartbeat moves past exit_beats */
};

/*
 * The watch loop's state.  `state` runs WATCHING -> (KILLED) -> DYING -> DONE, or ends in
 * STOPPED at any time; it is the public enum pvsched_guardian_state (info.state).  `armed`
 * is separate: it only decides whether a still heartbeat means a hang.
 */
struct watch {
	enum pvsched_guardian_state state;
	int armed;                /* the heartbeat was seen moving: from then on its silence means a hang */
	enum exit_watch exit;
	int64_t fast_until;       /* EXIT_FAST ends here */
	uint64_t exit_beats;      /* the heartbeat when the last such exit was seen */
	uint64_t beats;           /* the heartbeat last seen ... */
	int64_t last_change;      /* ... and when it last moved (CLOCK_MONOTONIC ns) */
};

static int watch_running(const struct watch *w)
{
	return w->state == PVSCHED_GUARDIAN_WATCHING || w->state == PVSCHED_GUARDIAN_KILLED ||
	       w->state == PVSCHED_GUARDIAN_DYING;
}

/* The poll() timeout now; ends EXIT_FAST once its window is over. */
static int poll_timeout(const struct pvsched_guardian *g, struct watch *w, int64_t t)
{
	if (w->state == PVSCHED_GUARDIAN_DYING)
		return g->period_ms;  /* restored; only the final death is left to see, and the pidfd shows it */
	if (w->exit == EXIT_FAST && t >= w->fast_until)
		w->exit = w->beats == w->exit_beats ? EXIT_SUSPECT : EXIT_QUIET;
	switch (w->exit) {
	case EXIT_FAST:
		return FAST_MS;
	case EXIT_SUSPECT:
		return SUSPECT_MS;
	default:
		return g->period_ms;
	}
}

/*
 * What to poll: the process's pidfd, the stop eventfd, then (not once DYING: a thread that
 * exits stays readable, and the loop would spin at FIFO until the process is gone) the
 * threads' pidfds, -1 (skipped by poll) once fired.  Returns the count.
 */
static int fill_pollfds(const struct pvsched_guardian *g, const struct watch *w, struct pollfd *pfd)
{
	pfd[0] = (struct pollfd){ .fd = g->pidfd, .events = POLLIN };
	pfd[1] = (struct pollfd){ .fd = g->stopfd, .events = POLLIN };
	if (w->state == PVSCHED_GUARDIAN_DYING)
		return 2;
	for (int i = 0; i < g->nr_watched; i++)
		pfd[2 + i] = (struct pollfd){ .fd = g->watched[i].fd, .events = POLLIN };
	return 2 + g->nr_watched;
}

/* 1 if a watched thread's pidfd fired (that thread exited); those are closed and not polled again. */
static int reap_watched(struct pvsched_guardian *g, const struct pollfd *pfd, int n)
{
	int exited = 0;

	for (int i = 0; n > 0 && i < g->nr_watched; i++) {
		if (pfd[2 + i].fd >= 0 && pfd[2 + i].revents) {
			exited = 1;
			close(g->watched[i].fd);
			g->watched[i].fd = -1;  /* stays readable: not polled again */
		}
	}
	return exited;
}

/* The heartbeat read at `t`: arms the guardian when it moves, kills a hung policy process when it stays still. */
static void check_heartbeat(struct pvsched_guardian *g, struct watch *w, int64_t t, uint64_t beats)
{
	if (beats != w->beats) {
		w->beats = beats;
		w->last_change = t;
		w->armed = 1;  /* the policy process beats: from now on its silence means a hang */
		return;
	}
	if (w->state == PVSCHED_GUARDIAN_WATCHING && w->armed && !__atomic_load_n(&g->disarmed, __ATOMIC_RELAXED)
	    && t - w->last_change > g->stale_ns) {
		syscall(SYS_pidfd_send_signal, g->pidfd, SIGKILL, NULL, 0);
		on_event(g, t, PVSCHED_GUARDIAN_CAUSE_STALE, t - w->last_change);
		w->state = PVSCHED_GUARDIAN_KILLED;
	}
}

/* One wake-up while the policy process lives (WATCHING or KILLED): its threads, then its heartbeat. */
static void check_process(struct pvsched_guardian *g, struct watch *w, const struct pollfd *pfd, int n, int64_t t)
{
	int exited = reap_watched(g, pfd, n), nr_threads;
	uint64_t beats;

	/*
	 * Every wake-up reads /proc/<pid>/stat, even while the heartbeat moves (reading it only
	 * when the heartbeat stands still sees such a death up to two periods late): a killed
	 * process's last thread can stay in do_exit for 100 ms and more (closing its BPF links
	 * waits for an RCU grace period the boosted vCPUs hold up), with no pidfd readable
	 * meanwhile, so PF_EXITING seen here is the only early sign of its death.
	 */
	beats = __atomic_load_n(&g->hb->beats, __ATOMIC_RELAXED);
	if (w->exit == EXIT_SUSPECT && beats != w->exit_beats)
		w->exit = EXIT_QUIET;  /* the heartbeat moves on: that thread ended alone */
	if (leader_exiting(g, &nr_threads) || exited) {
		if (all_exiting(g)) {
			on_event(g, t, PVSCHED_GUARDIAN_CAUSE_DIED, 0);  /* a stale kill keeps its own cause */
			w->state = PVSCHED_GUARDIAN_DYING;
			return;
		}
		if (w->exit != EXIT_FAST || t >= w->fast_until)
			w->fast_until = t + FAST_WINDOW_NS;
		w->exit = EXIT_FAST;
		w->exit_beats = beats;
	}
	if (nr_threads != g->nr_threads_seen) {
		g->nr_threads_seen = nr_threads;
		watch_threads(g);
	}
	check_heartbeat(g, w, t, beats);
	pthread_mutex_lock(&g->lock);
	g->info.watched = 0;
	for (int i = 0; i < g->nr_watched; i++)
		g->info.watched += g->watched[i].fd >= 0;
	g->info.beats = beats;
	g->info.armed = w->armed && w->state == PVSCHED_GUARDIAN_WATCHING &&
			!__atomic_load_n(&g->disarmed, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&g->lock);
}

/* The guardian thread's own set-up: TID, name, memory lock, and what it got (info). */
static void thread_setup(struct pvsched_guardian *g)
{
	struct sched_param sp;
	int policy, locked;

	__atomic_store_n(&g->thread_tid, (pid_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
	pthread_setname_np(pthread_self(), "pvsched-guard");
	locked = lock_memory(g);
	pthread_mutex_lock(&g->lock);
	g->info.locked = locked;
	if (pthread_getschedparam(pthread_self(), &policy, &sp) == 0 && policy == SCHED_FIFO)
		g->info.prio = sp.sched_priority;
	g->info.state = PVSCHED_GUARDIAN_WATCHING;
	pthread_mutex_unlock(&g->lock);
	leader_exiting(g, &g->nr_threads_seen);
	watch_threads(g);
}

static void *guardian_main(void *arg)
{
	struct pvsched_guardian *g = arg;
	struct pollfd pfd[2 + MAX_WATCHED];
	struct watch w = {
		.state = PVSCHED_GUARDIAN_WATCHING,
		.exit = EXIT_QUIET,
		.beats = g->hb->beats,
		.last_change = now_ns(),
	};

	thread_setup(g);
	while (watch_running(&w)) {
		enum pvsched_guardian_state before_state = w.state;
		int nfds = fill_pollfds(g, &w, pfd), n, timeout_ms;
		int64_t t, before;

		before = now_ns();
		timeout_ms = poll_timeout(g, &w, before);
		n = poll(pfd, nfds, timeout_ms);
		t = now_ns();
		/*
		 * Woken far later than asked: this thread, at FIFO above everything the policy runs, was
		 * not run either (on a host that is itself a VM, the hypervisor below can stall it for
		 * up to 100 ms).  The heartbeat's silence over that time says nothing about the policy process.
		 */
		if (t - before > (int64_t)timeout_ms * 1000000 + LATE_NS)
			w.last_change = t;

		if (n < 0) {
			struct timespec ts = { 0, (long)g->period_ms * 1000000 };

			if (errno == EINTR)
				continue;
			pthread_mutex_lock(&g->lock);
			g->info.errors++;
			g->info.last_errno = errno;
			pthread_mutex_unlock(&g->lock);
			nanosleep(&ts, NULL);  /* never spin on a failing poll */
			continue;
		}
		if (n > 0 && pfd[0].revents) {  /* gone (POLLIN), or a broken pidfd: restoring is always safe */
			on_event(g, t, PVSCHED_GUARDIAN_CAUSE_DIED, 0);
			w.state = PVSCHED_GUARDIAN_DONE;
		} else if (n > 0 && pfd[1].revents) {
			w.state = PVSCHED_GUARDIAN_STOPPED;
		} else if (w.state != PVSCHED_GUARDIAN_DYING) {
			check_process(g, &w, pfd, n, t);
		}
		if (w.state != before_state)
			set_state(g, w.state);
	}
	return NULL;
}

/* 0 if `pidfd` refers to process `pid` (its fdinfo's Pid line), else -ESRCH. */
static int check_pidfd(int pidfd, int pid)
{
	char path[64], buf[1024], *p;
	int fd, n = -1;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", pidfd);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (read_text(fd, buf, sizeof(buf)) == 0 && (p = strstr(buf, "\nPid:")) != NULL)
		sscanf(p + 5, "%d", &n);
	close(fd);
	return n == pid ? 0 : -ESRCH;
}

int pvsched_guardian_start(struct pvsched_guardian *g, int pid, int pidfd, int prio, int period_ms, int stale_ms)
{
	pthread_attr_t attr;
	struct sched_param sp = { .sched_priority = prio };
	char path[64];
	sigset_t all, old;
	int rc;

	if (g->started)
		return -EBUSY;
	if (pid <= 0 || period_ms < 1 || stale_ms < period_ms || prio < 0 || prio > 99)
		return -EINVAL;
	rc = check_pidfd(pidfd, pid);
	if (rc < 0)
		return rc;
	g->pid = pid;
	g->pidfd = fcntl(pidfd, F_DUPFD_CLOEXEC, 0);  /* our own: the caller may close theirs any time */
	if (g->pidfd < 0)
		return -errno;
	/* The pidfd pins the pid (we are the parent and have not reaped it): /proc/<pid> is that process. */
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	g->stat_fd = open(path, O_RDONLY | O_CLOEXEC);
	g->period_ms = period_ms;
	g->stale_ns = (int64_t)stale_ms * 1000000;
	g->info.state = PVSCHED_GUARDIAN_IDLE;

	/* Signals stay with the VMM's own threads: the guardian inherits a full mask. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, STACK_SIZE);
	rc = EINVAL;
	if (prio > 0) {
		pthread_attr_setinheritsched(&attr, PTHREAD_EXPLICIT_SCHED);
		pthread_attr_setschedpolicy(&attr, SCHED_FIFO);
		pthread_attr_setschedparam(&attr, &sp);
		rc = pthread_create(&g->thread, &attr, guardian_main, g);
	}
	if (rc != 0) {  /* no CAP_SYS_NICE: still better than nothing at the caller's policy */
		pthread_attr_setinheritsched(&attr, PTHREAD_INHERIT_SCHED);
		rc = pthread_create(&g->thread, &attr, guardian_main, g);
	}
	pthread_attr_destroy(&attr);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		close_fds(g);
		return -rc;
	}
	g->started = 1;
	return 0;
}

void pvsched_guardian_disarm(struct pvsched_guardian *g)
{
	__atomic_store_n(&g->disarmed, 1, __ATOMIC_RELAXED);
}

int pvsched_guardian_stop(struct pvsched_guardian *g)
{
	uint64_t one = 1;
	pid_t tid;

	if (!g->started)
		return 0;
	if (write(g->stopfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		return -errno;
	pthread_join(g->thread, NULL);
	/* pthread_join returns once the kernel cleared the thread's TID word (in mm_release), which is
	 * before the task is released: its /proc entry and TID can outlive the join for a moment.
	 * "Stopped" means gone, so wait (bounded, 1 s) until the TID leaves this thread group. */
	tid = __atomic_load_n(&g->thread_tid, __ATOMIC_ACQUIRE);
	for (int i = 0; tid > 0 && i < 10000 && syscall(SYS_tgkill, getpid(), tid, 0) == 0; i++)
		usleep(100);
	g->thread_tid = 0;
	g->started = 0;
	close_fds(g);
	return 0;
}

void pvsched_guardian_info(struct pvsched_guardian *g, struct pvsched_guardian_info *out)
{
	pthread_mutex_lock(&g->lock);
	*out = g->info;
	pthread_mutex_unlock(&g->lock);
}

void pvsched_guardian_free(struct pvsched_guardian *g)
{
	if (!g)
		return;
	pvsched_guardian_stop(g);
	close(g->stopfd);
	munmap((void *)g->hb, HEARTBEAT_SIZE);
	close(g->hb_fd);
	pthread_mutex_destroy(&g->lock);
	munlock(g, sizeof(*g));
	munmap(g, sizeof(*g));
}
