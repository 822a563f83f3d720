// SPDX-License-Identifier: GPL-2.0 OR MIT
/* Text output helpers; pure, unit-tested on the host. */
#include "fmt.h"

void buf_init(struct buf *b, char *mem, u32 cap)
{
	b->p = mem;
	b->len = 0;
	b->cap = cap ? cap - 1 : 0;
	b->overflow = 0;
	if (cap)
		mem[0] = 0;
}

void buf_ch(struct buf *b, char c)
{
	if (b->len >= b->cap) {
		b->overflow = 1;
		return;
	}
	b->p[b->len++] = c;
	b->p[b->len] = 0;
}

void buf_str(struct buf *b, const char *s)
{
	while (*s)
		buf_ch(b, *s++);
}

void buf_u64(struct buf *b, u64 v)
{
	char t[20];
	int n = 0;

	do {
		t[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		buf_ch(b, t[--n]);
}

void buf_s64(struct buf *b, s64 v)
{
	if (v < 0) {
		buf_ch(b, '-');
		buf_u64(b, (u64)0 - (u64)v);
	} else {
		buf_u64(b, (u64)v);
	}
}

void buf_hex(struct buf *b, u64 v)
{
	static const char digits[] = "0123456789abcdef";
	char t[16];
	int n = 0;

	buf_str(b, "0x");
	do {
		t[n++] = digits[v & 0xf];
		v >>= 4;
	} while (v);
	while (n)
		buf_ch(b, t[--n]);
}

void buf_us3(struct buf *b, u64 ns)
{
	u64 frac = ns % 1000;

	buf_u64(b, ns / 1000);
	buf_ch(b, '.');
	buf_ch(b, (char)('0' + frac / 100));
	buf_ch(b, (char)('0' + frac / 10 % 10));
	buf_ch(b, (char)('0' + frac % 10));
}

void buf_jstr(struct buf *b, const char *s)
{
	static const char digits[] = "0123456789abcdef";

	buf_ch(b, '"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			buf_ch(b, '\\');
			buf_ch(b, (char)c);
		} else if (c < 0x20 || c >= 0x7f) {
			buf_str(b, "\\u00");
			buf_ch(b, digits[c >> 4]);
			buf_ch(b, digits[c & 0xf]);
		} else {
			buf_ch(b, (char)c);
		}
	}
	buf_ch(b, '"');
}

u32 tg_strlen(const char *s)
{
	u32 n = 0;

	while (s[n])
		n++;
	return n;
}

int tg_streq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

#ifndef TG_HOST_TEST
/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, size_t n)
{
	unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}
#endif
