"""libbpf (libbpf.so.1) through cffi in ABI mode: the dozen calls the loader needs, no compiler at run time."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import cffi

# Prototypes as in libbpf 1.1 (Debian libbpf1 1.1.2); opaque structs stay opaque.
_CDEF = """
struct bpf_object; struct bpf_program; struct bpf_map; struct bpf_link; struct ring_buffer;
struct bpf_object_open_opts;
struct ring_buffer_opts;
typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
typedef int (*libbpf_print_fn_t)(int level, const char *, void *ap);

struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    uint32_t data_size_in;
    uint32_t data_size_out;
    const void *ctx_in;
    void *ctx_out;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint32_t retval;
    int repeat;
    uint32_t duration;
    uint32_t flags;
    uint32_t cpu;
    uint32_t batch_size;
};

/* uapi struct bpf_prog_info up to attach_btf_id (gpl_compatible bitfield as a plain u32) */
struct bpf_prog_info {
    uint32_t type; uint32_t id; uint8_t tag[8];
    uint32_t jited_prog_len; uint32_t xlated_prog_len;
    uint64_t jited_prog_insns; uint64_t xlated_prog_insns;
    uint64_t load_time; uint32_t created_by_uid; uint32_t nr_map_ids; uint64_t map_ids;
    char name[16]; uint32_t ifindex; uint32_t gpl_compatible;
    uint64_t netns_dev; uint64_t netns_ino;
    uint32_t nr_jited_ksyms; uint32_t nr_jited_func_lens;
    uint64_t jited_ksyms; uint64_t jited_func_lens;
    uint32_t btf_id; uint32_t func_info_rec_size; uint64_t func_info;
    uint32_t nr_func_info; uint32_t nr_line_info; uint64_t line_info; uint64_t jited_line_info;
    uint32_t nr_jited_line_info; uint32_t line_info_rec_size; uint32_t jited_line_info_rec_size;
    uint32_t nr_prog_tags; uint64_t prog_tags;
    uint64_t run_time_ns; uint64_t run_cnt; uint64_t recursion_misses;
    uint32_t verified_insns; uint32_t attach_btf_obj_id; uint32_t attach_btf_id;
};

struct btf;
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
struct btf *btf__load_vmlinux_btf(void);
struct btf *btf__load_module_btf(const char *module_name, struct btf *vmlinux_btf);
int btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
void btf__free(struct btf *btf);
long libbpf_get_error(const void *ptr);

struct bpf_object *bpf_object__open_file(const char *path, const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);

const char *bpf_program__name(const struct bpf_program *prog);
const char *bpf_program__section_name(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);
bool bpf_program__autoload(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
int bpf_link__destroy(struct bpf_link *link);
int bpf_link__fd(const struct bpf_link *link);

int bpf_map__fd(const struct bpf_map *map);
uint32_t bpf_map__max_entries(const struct bpf_map *map);
int bpf_map__pin(struct bpf_map *map, const char *path);
int bpf_map__unpin(struct bpf_map *map, const char *path);

int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_get(const char *pathname);
struct bpf_obj_get_opts { size_t sz; uint32_t file_flags; };
int bpf_obj_get_opts(const char *pathname, const struct bpf_obj_get_opts *opts);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                   uint32_t max_entries, const void *opts);
int bpf_map__reuse_fd(struct bpf_map *map, int fd);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
int bpf_prog_get_fd_by_id(uint32_t id);
int bpf_prog_get_next_id(uint32_t start_id, uint32_t *next_id);
int bpf_link_get_fd_by_id(uint32_t id);
int bpf_map_get_fd_by_id(uint32_t id);
/* uapi struct bpf_link_info: its common head only (the kernel fills what info_len holds) */
struct bpf_link_info { uint32_t type; uint32_t id; uint32_t prog_id; };
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_enable_stats(int type);
int libbpf_num_possible_cpus(void);

struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                     const struct ring_buffer_opts *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);
"""

BPF_ANY = 0
BPF_F_RDONLY = 1 << 3  # file_flags of BPF_OBJ_GET: an fd that cannot update the map
BPF_MAP_TYPE_ARRAY = 2
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_STATS_RUN_TIME = 0
BTF_KIND_TYPEDEF = 8


class LibbpfError(OSError):
    """A libbpf call failed; errno and a message naming the call."""


@functools.cache
def ffi() -> cffi.FFI:
    """The FFI with libbpf's prototypes declared."""
    f = cffi.FFI()
    f.cdef(_CDEF)
    return f


@functools.cache
def lib():
    """libbpf.so.1, opened once per process."""
    try:
        return ffi().dlopen("libbpf.so.1")
    except OSError as e:
        raise LibbpfError(errno.ENOENT, f"cannot load libbpf.so.1 (install libbpf1/libbpf-dev): {e}") from e


def check(rc: int, what: str) -> int:
    """Raise LibbpfError for a negative libbpf return (libbpf 1.x returns -errno)."""
    if rc < 0:
        err = -rc if rc != -1 else (ffi().errno or errno.EIO)
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return rc


def check_ptr(ptr, what: str):
    """Raise LibbpfError for a NULL pointer from libbpf (errno tells why)."""
    if ptr == ffi().NULL:
        err = ffi().errno or errno.EIO
        raise LibbpfError(err, f"{what}: {os.strerror(err)}")
    return ptr


def string(cptr) -> str:
    """A C string from libbpf as str."""
    return ffi().string(cptr).decode() if cptr != ffi().NULL else ""


def open_load_attach(path: Path) -> tuple[object, dict[str, tuple[int, object]]]:
    """Open and load the BPF object at `path` and attach every program in it.

    Returns (the object, {program name: (its fd, its link)}); on any failure everything is undone and
    LibbpfError raised.  The caller ends it with close_object()."""
    f, lb = ffi(), lib()
    obj = check_ptr(lb.bpf_object__open_file(str(path).encode(), f.NULL), f"opening {path.name}")
    progs: dict[str, tuple[int, object]] = {}
    try:
        check(lb.bpf_object__load(obj), f"loading {path.name}")
        prog = lb.bpf_object__next_program(obj, f.NULL)
        while prog != f.NULL:
            name = string(lb.bpf_program__name(prog))
            progs[name] = (lb.bpf_program__fd(prog), check_ptr(lb.bpf_program__attach(prog), f"attaching {name}"))
            prog = lb.bpf_object__next_program(obj, prog)
    except BaseException:
        close_object(obj, progs)
        raise
    return obj, progs


def close_object(obj, progs: dict[str, tuple[int, object]]) -> None:
    """Detach what open_load_attach() attached and free the object."""
    lb = lib()
    for _, link in progs.values():
        lb.bpf_link__destroy(link)
    progs.clear()
    if obj is not None and obj != ffi().NULL:
        lb.bpf_object__close(obj)


def prog_run_stats(fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a loaded program (counted while BPF run-time stats are on)."""
    f = ffi()
    info = f.new("struct bpf_prog_info *")
    n = f.new("uint32_t *", f.sizeof("struct bpf_prog_info"))
    check(lib().bpf_obj_get_info_by_fd(fd, info, n), "bpf_obj_get_info_by_fd")
    return info.run_cnt, info.run_time_ns


def loaded_programs(name: str) -> int:
    """How many programs named `name` the kernel has loaded now (CAP_SYS_ADMIN: get-fd-by-ID)."""
    f, lb = ffi(), lib()
    count, nxt, cur = 0, f.new("uint32_t *"), 0
    while lb.bpf_prog_get_next_id(cur, nxt) == 0:
        cur = nxt[0]
        fd = lb.bpf_prog_get_fd_by_id(cur)
        if fd < 0:
            continue  # unloaded since
        try:
            info = f.new("struct bpf_prog_info *")
            n = f.new("uint32_t *", f.sizeof("struct bpf_prog_info"))
            if lb.bpf_obj_get_info_by_fd(fd, info, n) == 0 and f.string(info.name).decode() == name[:15]:
                count += 1
        finally:
            os.close(fd)
    return count
