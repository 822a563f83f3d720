// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Host build of the test guest's pure C (command line, statistics, text
 * output) for tests/testguest/test_units.py:
 *   unit_harness cmdline NR_VCPUS STRING   -> one JSON object (config or error)
 *   unit_harness stats < ns values          -> the guest's latency JSON members
 *   unit_harness us3 NS | jstr STRING       -> the formatted text
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "stats.h"

static int do_cmdline(u32 nr, const char *s)
{
	struct tg_config c;
	char err[160];
	int r = tg_parse_cmdline(s, nr, &c, err, sizeof(err));
	u32 v, p;

	if (r < 0) {
		printf("{\"rc\":%d,\"error\":\"%s\"}\n", r, err);
		return 0;
	}
	printf("{\"rc\":%d,\"warning\":\"%s\",\"duration_ms\":%u,\"interval_us\":%u,"
	       "\"probe_policy\":%d,\"probe_prio\":%u,\"hog_prio\":%u,\"busy_nice\":%d,\"tick_us\":%u,\"pvsched\":%u,"
	       "\"version\":%u,\"features\":%u,\"force_features\":%u,\"timer_oneshot\":%u,"
	       "\"lock_hold_us\":%u,\"lock_gap_us\":%u,\"lock_tick_us\":%u,\"lock_busy_us\":%u,\"workload\":[",
	       r, r ? err : "", c.duration_ms, c.interval_us, c.probe_policy, c.probe_prio,
	       c.hog_prio, c.busy_nice, c.tick_us, c.pvsched_enabled, c.pvsched_version, c.pvsched_features,
	       c.force_features, c.timer_oneshot, c.lock_hold_us, c.lock_gap_us, c.lock_tick_us, c.lock_busy_us);
	for (v = 0; v < c.nr_vcpus; v++) {
		printf("%s\"", v ? "," : "");
		for (p = 0; p < c.nr_phases[v]; p++)
			printf("%s%s", p ? "+" : "", tg_workload_name(c.phases[v][p]));
		printf("\"");
	}
	printf("]}\n");
	return 0;
}

static int do_stats(void)
{
	static u32 mem[1 << 20];
	static char out[1 << 16];
	struct tg_lat l;
	struct tg_summary s;
	struct buf b;
	unsigned long long v;
	u32 cap = 1 << 20;
	const char *cap_env = getenv("CAP");

	if (cap_env)
		cap = (u32)atoi(cap_env);
	lat_init(&l, mem, cap);
	while (scanf("%llu", &v) == 1)
		lat_record(&l, v);
	lat_summarize(&l, &s);
	buf_init(&b, out, sizeof(out));
	buf_ch(&b, '{');
	lat_json(&b, &l, &s);
	buf_ch(&b, '}');
	puts(out);
	return b.overflow;
}

int main(int argc, char **argv)
{
	char out[4096];
	struct buf b;

	buf_init(&b, out, sizeof(out));
	if (argc == 4 && !strcmp(argv[1], "cmdline"))
		return do_cmdline((u32)atoi(argv[2]), argv[3]);
	if (argc == 2 && !strcmp(argv[1], "stats"))
		return do_stats();
	if (argc == 3 && !strcmp(argv[1], "us3")) {
		buf_us3(&b, strtoull(argv[2], 0, 10));
		puts(out);
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "jstr")) {
		buf_jstr(&b, argv[2]);
		puts(out);
		return 0;
	}
	fprintf(stderr, "usage: see the comment at the top\n");
	return 2;
}
