/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/* Appending text to a fixed buffer (no libc): what the JSON lines are made of. */
#ifndef TG_FMT_H
#define TG_FMT_H

#include "types.h"

struct buf {
	char *p;
	u32 len;
	u32 cap;      /* bytes usable, one kept for the NUL */
	u32 overflow; /* set when something did not fit */
};

void buf_init(struct buf *b, char *mem, u32 cap);
void buf_ch(struct buf *b, char c);
void buf_str(struct buf *b, const char *s);
void buf_u64(struct buf *b, u64 v);
void buf_s64(struct buf *b, s64 v);
void buf_hex(struct buf *b, u64 v);
/* Nanoseconds printed as microseconds with three decimals: 12345 -> 12.345. */
void buf_us3(struct buf *b, u64 ns);
/* A JSON string (quotes and escapes added). */
void buf_jstr(struct buf *b, const char *s);

u32 tg_strlen(const char *s);
int tg_streq(const char *a, const char *b);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);

#endif
