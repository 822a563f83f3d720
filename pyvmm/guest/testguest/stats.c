// SPDX-License-Identifier: GPL-2.0 OR MIT
/* Latency summary: sort, nearest-rank percentiles, histogram, JSON. */
#include "stats.h"

void lat_init(struct tg_lat *l, u32 *mem, u32 cap)
{
	memset(l, 0, sizeof(*l));
	l->samples = mem;
	l->cap = cap;
}

static void sift_down(u32 *a, u32 root, u32 n)
{
	for (;;) {
		u32 child = 2 * root + 1, t;

		if (child >= n)
			return;
		if (child + 1 < n && a[child + 1] > a[child])
			child++;
		if (a[root] >= a[child])
			return;
		t = a[root];
		a[root] = a[child];
		a[child] = t;
		root = child;
	}
}

void tg_sort_u32(u32 *a, u32 n)
{
	u32 i, t;

	if (n < 2)
		return;
	for (i = n / 2; i-- > 0;)
		sift_down(a, i, n);
	for (i = n - 1; i > 0; i--) {
		t = a[0];
		a[0] = a[i];
		a[i] = t;
		sift_down(a, 0, i);
	}
}

u32 tg_percentile(const u32 *a, u32 n, u32 permille)
{
	u64 rank;

	if (!n)
		return 0;
	rank = ((u64)n * permille + 999) / 1000; /* ceil(n * p), 1-based */
	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return a[rank - 1];
}

/* 1, 2, 5, 10, 20, 50, ... microseconds: the smallest with p99 < 100 buckets. */
static u32 pick_bucket_us(u32 p99_ns)
{
	u32 b = 1;
	static const u32 mult[3] = { 2, 5, 10 };
	u32 decade = 1, step = 0;

	while ((u64)p99_ns >= (u64)b * 1000 * 100 && b < 1000000000u / 10) {
		b = decade * mult[step];
		if (++step == 3) {
			step = 0;
			decade *= 10;
		}
	}
	return b;
}

void lat_summarize(struct tg_lat *l, struct tg_summary *s)
{
	u32 n = l->n;
	u64 last;

	tg_sort_u32(l->samples, n);
	s->n = n;
	s->min_ns = (n || l->dropped) ? l->min_ns : 0;
	s->max_ns = l->max_ns;
	s->avg_ns = (n + l->dropped) ? l->sum_ns / (n + l->dropped) : 0;
	s->p50_ns = tg_percentile(l->samples, n, 500);
	s->p90_ns = tg_percentile(l->samples, n, 900);
	s->p99_ns = tg_percentile(l->samples, n, 990);
	s->p999_ns = tg_percentile(l->samples, n, 999);
	s->bucket_us = pick_bucket_us(s->p99_ns);
	last = n ? (u64)l->samples[n - 1] / 1000 / s->bucket_us : 0;
	s->nbuckets = n ? (u32)(last + 1 < TG_HIST_MAX_BUCKETS ? last + 1 :
					     TG_HIST_MAX_BUCKETS) : 0;
}

void lat_json(struct buf *b, const struct tg_lat *l, const struct tg_summary *s)
{
	u64 width_ns = (u64)s->bucket_us * 1000;
	u32 i = 0, k, overflow;

	buf_str(b, "\"samples\":");
	buf_u64(b, s->n);
	buf_str(b, ",\"missed\":");
	buf_u64(b, l->missed);
	if (l->dropped) {
		buf_str(b, ",\"dropped\":");
		buf_u64(b, l->dropped);
	}
	buf_str(b, ",\"min\":");
	buf_us3(b, s->min_ns);
	buf_str(b, ",\"avg\":");
	buf_us3(b, s->avg_ns);
	buf_str(b, ",\"p50\":");
	buf_us3(b, s->p50_ns);
	buf_str(b, ",\"p90\":");
	buf_us3(b, s->p90_ns);
	buf_str(b, ",\"p99\":");
	buf_us3(b, s->p99_ns);
	buf_str(b, ",\"p999\":");
	buf_us3(b, s->p999_ns);
	buf_str(b, ",\"max\":");
	buf_us3(b, s->max_ns);
	buf_str(b, ",\"max_at\":");
	buf_u64(b, l->max_at);
	buf_str(b, ",\"hist\":{\"bucket_us\":");
	buf_u64(b, s->bucket_us);
	buf_str(b, ",\"counts\":[");
	/* Samples are sorted: walk them once, bucket by bucket. */
	for (k = 0; k < s->nbuckets; k++) {
		u64 hi = (u64)(k + 1) * width_ns;
		u32 c = 0;

		while (i < s->n && l->samples[i] < hi) {
			i++;
			c++;
		}
		if (k)
			buf_ch(b, ',');
		buf_u64(b, c);
	}
	overflow = s->n - i;
	buf_str(b, "],\"overflow\":");
	buf_u64(b, overflow);
	buf_ch(b, '}');
}
