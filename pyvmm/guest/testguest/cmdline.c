// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Command-line parsing for the test guest: space-separated key=value pairs.
 * Runs once on vCPU 0 at CPL0, which KVM's PVM backend emulates (slowly):
 * it stays a single pass with no allocation.  Pure: unit-tested on the host.
 */
#include "config.h"
#include "fmt.h"

static const char *const wl_names[] = {
	[TG_WL_PROBE] = "probe",
	[TG_WL_BUSY] = "busy",
	[TG_WL_HOG] = "hog",
	[TG_WL_IDLE] = "idle",
	[TG_WL_WAKER] = "waker",
	[TG_WL_WAKEE] = "wakee",
	[TG_WL_TICK] = "tick",
	[TG_WL_LOCK] = "lock",
};

const char *tg_workload_name(u32 w)
{
	return w < ARRAY_SIZE(wl_names) ? wl_names[w] : "?";
}

/* A token is [s, e): compare it with a NUL-terminated word. */
static int tok_eq(const char *s, const char *e, const char *word)
{
	while (s < e && *word && *s == *word) {
		s++;
		word++;
	}
	return s == e && !*word;
}

static void set_err(char *err, u32 errlen, const char *what, const char *s,
		    const char *e)
{
	struct buf b;

	if (!errlen)
		return;
	buf_init(&b, err, errlen);
	buf_str(&b, what);
	buf_str(&b, ": '");
	while (s < e)
		buf_ch(&b, *s++);
	buf_ch(&b, '\'');
}

/* Decimal integer in [s, e) into *v, at most max. */
static int parse_uint(const char *s, const char *e, u64 max, u64 *v)
{
	u64 r = 0;

	if (s == e)
		return -1;
	for (; s < e; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		r = r * 10 + (u64)(*s - '0');
		if (r > max)
			return -1;
	}
	*v = r;
	return 0;
}

/* Hexadecimal with optional 0x, up to 32 bits. */
static int parse_hex32(const char *s, const char *e, u32 *v)
{
	u64 r = 0;

	if (e - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		s += 2;
	if (s == e || e - s > 8)
		return -1;
	for (; s < e; s++) {
		u32 d;

		if (*s >= '0' && *s <= '9')
			d = (u32)(*s - '0');
		else if (*s >= 'a' && *s <= 'f')
			d = (u32)(*s - 'a' + 10);
		else if (*s >= 'A' && *s <= 'F')
			d = (u32)(*s - 'A' + 10);
		else
			return -1;
		r = r << 4 | d;
	}
	*v = (u32)r;
	return 0;
}

/* Seconds with up to three decimals ("2", "1.5", "0.25") into milliseconds. */
static int parse_seconds_ms(const char *s, const char *e, u64 *ms)
{
	const char *dot = s;
	u64 whole, frac = 0;
	int digits;

	while (dot < e && *dot != '.')
		dot++;
	if (parse_uint(s, dot, 3600, &whole))
		return -1;
	if (dot < e) {
		const char *f = dot + 1;

		if (f == e || e - f > 3)
			return -1;
		if (parse_uint(f, e, 999, &frac))
			return -1;
		for (digits = (int)(e - f); digits < 3; digits++)
			frac *= 10;
	}
	*ms = whole * 1000 + frac;
	return 0;
}

static int parse_workload_name(const char *s, const char *e, u8 *w)
{
	u32 i;

	for (i = 0; i < ARRAY_SIZE(wl_names); i++) {
		if (tok_eq(s, e, wl_names[i])) {
			*w = (u8)i;
			return 0;
		}
	}
	return -1;
}

/* workload=<w>[,<w>...], each w a '+'-joined sequence of phases. */
static int parse_workloads(const char *s, const char *e, struct tg_config *c,
			   char *err, u32 errlen)
{
	u32 n = 0, i;

	while (s <= e) {
		const char *ce = s;
		u8 np = 0;

		while (ce < e && *ce != ',')
			ce++;
		if (n >= c->nr_vcpus) {
			set_err(err, errlen,
				"workload: more entries than vCPUs at", s, e);
			return -1;
		}
		while (s <= ce) {
			const char *pe = s;

			while (pe < ce && *pe != '+')
				pe++;
			if (np >= TG_MAX_PHASES) {
				set_err(err, errlen, "workload: too many phases in", s, ce);
				return -1;
			}
			if (parse_workload_name(s, pe, &c->phases[n][np])) {
				set_err(err, errlen,
					"workload: expected probe|busy|hog|idle|waker|wakee|tick|lock, got", s, pe);
				return -1;
			}
			np++;
			s = pe + 1;
		}
		c->nr_phases[n++] = np;
		s = ce + 1;
	}
	/* Fewer entries than vCPUs: the last one repeats. */
	for (i = n; i < c->nr_vcpus; i++) {
		u32 p;

		c->nr_phases[i] = c->nr_phases[n - 1];
		for (p = 0; p < c->nr_phases[i]; p++)
			c->phases[i][p] = c->phases[n - 1][p];
	}
	return 0;
}

static void defaults(struct tg_config *c, u32 nr_vcpus)
{
	u32 i;

	memset(c, 0, sizeof(*c));
	c->duration_ms = 5000;
	c->interval_us = 1000;
	c->probe_policy = PVSCHED_POLICY_RR;
	c->probe_prio = 8;
	c->hog_prio = 99;
	c->tick_us = 200;
	c->lock_hold_us = 5;
	c->lock_gap_us = 5;
	c->lock_tick_us = 4000;
	c->pvsched_enabled = 1;
	c->pvsched_version = PVSCHED_VERSION;
	c->pvsched_features = TG_PVSCHED_FEATURES;
	c->nr_vcpus = nr_vcpus;
	for (i = 0; i < nr_vcpus; i++) {
		c->nr_phases[i] = 1;
		c->phases[i][0] = TG_WL_PROBE;
	}
}

/* One key=value pair: 0 ok, 1 unknown key (a warning), -1 bad value. */
static int parse_pair(const char *k, const char *ke, const char *v,
		      const char *e, struct tg_config *c, char *err, u32 errlen)
{
	u64 x;

	if (tok_eq(k, ke, "duration")) {
		if (parse_seconds_ms(v, e, &x) || x == 0)
			goto bad;
		c->duration_ms = (u32)x;
	} else if (tok_eq(k, ke, "interval")) {
		if (parse_uint(v, e, 1000000, &x) || x < 50)
			goto bad;
		c->interval_us = (u32)x;
	} else if (tok_eq(k, ke, "workload")) {
		return parse_workloads(v, e, c, err, errlen);
	} else if (tok_eq(k, ke, "probe_policy")) {
		if (tok_eq(v, e, "rr"))
			c->probe_policy = PVSCHED_POLICY_RR;
		else if (tok_eq(v, e, "fifo"))
			c->probe_policy = PVSCHED_POLICY_FIFO;
		else
			goto bad;
	} else if (tok_eq(k, ke, "probe_prio")) {
		if (parse_uint(v, e, 99, &x) || x < 1)
			goto bad;
		c->probe_prio = (u32)x;
	} else if (tok_eq(k, ke, "hog_prio")) {
		if (parse_uint(v, e, 99, &x) || x < 1)
			goto bad;
		c->hog_prio = (u32)x;
	} else if (tok_eq(k, ke, "busy_nice")) {
		int neg = v < e && *v == '-';

		if (parse_uint(v + neg, e, neg ? 20 : 19, &x))
			goto bad;
		c->busy_nice = neg ? -(s32)x : (s32)x;
	} else if (tok_eq(k, ke, "tick_us")) {
		if (parse_uint(v, e, 1000000, &x))
			goto bad;
		c->tick_us = (u32)x;
	} else if (tok_eq(k, ke, "lock_hold_us")) {
		if (parse_uint(v, e, 100000, &x))
			goto bad;
		c->lock_hold_us = (u32)x;
	} else if (tok_eq(k, ke, "lock_gap_us")) {
		if (parse_uint(v, e, 100000, &x))
			goto bad;
		c->lock_gap_us = (u32)x;
	} else if (tok_eq(k, ke, "lock_busy_us")) {
		if (parse_uint(v, e, 1000000, &x))
			goto bad;
		c->lock_busy_us = (u32)x;
	} else if (tok_eq(k, ke, "lock_tick_us")) {
		/* 0 (no tick) or a period the emulated interrupt path can keep up with */
		if (parse_uint(v, e, 1000000, &x) || (x && x < 100))
			goto bad;
		c->lock_tick_us = (u32)x;
	} else if (tok_eq(k, ke, "pvsched_version")) {
		if (parse_hex32(v, e, &c->pvsched_version))
			goto bad;
	} else if (tok_eq(k, ke, "pvsched_features")) {
		if (parse_hex32(v, e, &c->pvsched_features))
			goto bad;
		c->force_features = 1;
	} else if (tok_eq(k, ke, "timer")) {
		if (tok_eq(v, e, "oneshot"))
			c->timer_oneshot = 1;
		else if (tok_eq(v, e, "auto"))
			c->timer_oneshot = 0;
		else
			goto bad;
	} else if (tok_eq(k, ke, "pvsched")) {
		if (tok_eq(v, e, "0"))
			c->pvsched_enabled = 0;
		else if (tok_eq(v, e, "1"))
			c->pvsched_enabled = 1;
		else
			goto bad;
	} else {
		return 1;
	}
	return 0;
bad:
	set_err(err, errlen, "bad value", k, e);
	return -1;
}

int tg_parse_cmdline(const char *cmdline, u32 nr_vcpus, struct tg_config *c,
		     char *err, u32 errlen)
{
	const char *s = cmdline;
	int warn = 0;

	if (errlen)
		err[0] = 0;
	if (nr_vcpus == 0 || nr_vcpus > TG_MAX_VCPUS) {
		set_err(err, errlen, "unsupported number of vCPUs", s, s);
		return -1;
	}
	defaults(c, nr_vcpus);
	while (*s) {
		const char *k, *ke, *e;
		int r;

		while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
			s++;
		if (!*s)
			break;
		k = s;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n' && *s != '\r')
			s++;
		e = s;
		for (ke = k; ke < e && *ke != '='; ke++)
			;
		if (ke == e) {
			set_err(err, errlen, "expected key=value, got", k, e);
			return -1;
		}
		r = parse_pair(k, ke, ke + 1, e, c, err, errlen);
		if (r < 0)
			return -1;
		if (r > 0 && !warn) {
			set_err(err, errlen, "ignoring unknown key", k, ke);
			warn = 1;
		}
	}
	return warn;
}
