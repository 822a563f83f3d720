# SPDX-License-Identifier: GPL-2.0 OR MIT
# A C header as cffi's cdef reads it: preprocessed (no directives, no static asserts), after the
# fixed-width typedefs the headers expect from vmlinux.h or linux/types.h.  Made at build time so that
# no process (the sandboxed policy process cannot exec) needs a compiler at run time.
# Use in the recipe of a .cdef target:  $(call cdef,HEADER,MACRO_THAT_TURNS_OFF_ITS_ASSERTS)
CDEF_PROLOGUE := 'typedef unsigned char __u8;' 'typedef unsigned short __u16;' 'typedef unsigned int __u32;' \
	'typedef unsigned long long __u64;' 'typedef int __s32;'
cdef = printf '%s\n' $(CDEF_PROLOGUE) '\#include "$(abspath $(1))"' \
	| $(CC) -E -P -D$(2) -x c - > $@.tmp && mv $@.tmp $@
