/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * Latency samples of one probe phase and their summary (integers only: no
 * SSE here).  Recording is a few native instructions at CPL3; the summary
 * (sort, percentiles, histogram, JSON) runs once at the end.  Pure: also
 * compiled for the host by the unit tests.
 */
#ifndef TG_STATS_H
#define TG_STATS_H

#include "fmt.h"

#define TG_HIST_MAX_BUCKETS 200

struct tg_lat {
	u32 *samples; /* ns, clamped to u32 */
	u32 cap;
	u32 n;
	u32 min_ns;
	u32 max_ns;
	u32 max_at;   /* index of the first sample equal to max_ns (counting dropped ones) */
	u64 sum_ns;
	u64 missed;   /* deadlines that passed without their own wakeup */
	u64 dropped;  /* samples beyond cap (counted in min/avg/max only) */
};

struct tg_summary {
	u32 n;
	u32 min_ns, max_ns, p50_ns, p90_ns, p99_ns, p999_ns;
	u64 avg_ns;
	u32 bucket_us;
	u32 nbuckets;
};

void lat_init(struct tg_lat *l, u32 *mem, u32 cap);

static inline void lat_record(struct tg_lat *l, u64 ns)
{
	u32 v = ns > 0xffffffffull ? 0xffffffffu : (u32)ns;

	if (l->n + l->dropped == 0 || v < l->min_ns)
		l->min_ns = v;
	if (v > l->max_ns || l->n + l->dropped == 0) {
		l->max_ns = v;
		l->max_at = l->n + (u32)l->dropped;
	}
	l->sum_ns += v;
	if (l->n < l->cap)
		l->samples[l->n++] = v;
	else
		l->dropped++;
}

/* Sort the samples in place (heapsort: no recursion, no allocation). */
void tg_sort_u32(u32 *a, u32 n);

/* Nearest-rank percentile (permille: 500 = p50) of sorted a[0..n). */
u32 tg_percentile(const u32 *a, u32 n, u32 permille);

/* Sort and summarize; picks a histogram bucket width from p99. */
void lat_summarize(struct tg_lat *l, struct tg_summary *s);

/*
 * Append the latency fields of a summarized phase as JSON members:
 * "samples":..,"missed":..,"min":..,"avg":..,"p50":..,"p90":..,"p99":..,
 * "p999":..,"max":.. (microseconds), "max_at":I (0-based index of the
 * max's sample, which tells when in the run it happened) and "hist":{"bucket_us":B,"counts":[..],
 * "overflow":N} where counts[i] holds samples in [i*B, (i+1)*B) us.
 */
void lat_json(struct buf *b, const struct tg_lat *l, const struct tg_summary *s);

#endif
