// Umbrella header for liburing. <features.h> must come first: without it,
// every Swift file that also imports Glibc fails with "'__fds_bits' ... is
// not present in definition of 'fd_set'" (see DESIGN.md, facts checked).
#include <features.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/xattr.h>
#include <sys/syscall.h>
#include <unistd.h>

// liburing 2.3 declares io_uring_enable_rings but does not export it; the
// register call it stands for. Returns 0 or -errno.
static inline int cacheproxy_enable_rings(int ring_fd) {
    long result = syscall(__NR_io_uring_register, ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    return result < 0 ? -errno : 0;
}

#include <malloc.h>  // malloc_trim, mallinfo2: FreedMemory.swift
#include <sys/mman.h>
#include <sys/stat.h>
#include <stdint.h>
#include <stdlib.h>
#include <errno.h>

#ifndef __NR_cachestat
#define __NR_cachestat 451  /* the same number on every architecture since 6.5 */
#endif

struct cacheproxy_cachestat_range { uint64_t off; uint64_t len; };
struct cacheproxy_cachestat { uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; };

// Whether every page of [off, off+len) of fd is in the page cache, so that a
// sendfile of it does not wait for the disk. 1: all resident; 0: some page
// must be read first; -1: cannot tell (the caller then reads on its thread
// pool). cachestat (Linux 6.5) answers in one call; a kernel without it
// (ENOSYS, remembered) takes the mmap + mincore route, but only for a file
// this process owns: for another's file mincore may report every page as
// resident. An EPERM (a seccomp profile, or a file cachestat may not look
// at) is "cannot tell", never a guess.
static int cacheproxy_no_cachestat = 0;

static inline int cacheproxy_resident(int fd, uint64_t off, uint64_t len) {
    if (len == 0) return 1;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return -1;
    uint64_t first = off / (uint64_t)page, last = (off + len - 1) / (uint64_t)page;
    uint64_t pages = last - first + 1;
    if (!__atomic_load_n(&cacheproxy_no_cachestat, __ATOMIC_RELAXED)) {
        struct cacheproxy_cachestat_range range = { off, len };
        struct cacheproxy_cachestat stat;
        if (syscall(__NR_cachestat, fd, &range, &stat, 0) == 0) return stat.nr_cache >= pages ? 1 : 0;
        if (errno != ENOSYS) return -1;
        __atomic_store_n(&cacheproxy_no_cachestat, 1, __ATOMIC_RELAXED);
    }
    struct stat owner;
    if (fstat(fd, &owner) != 0 || owner.st_uid != geteuid()) return -1;
    uint64_t start = first * (uint64_t)page;
    size_t span = (size_t)(pages * (uint64_t)page);
    void *map = mmap(NULL, span, PROT_READ, MAP_SHARED, fd, (off_t)start);
    if (map == MAP_FAILED) return -1;
    unsigned char stack[1024];
    unsigned char *vec = pages <= sizeof stack ? stack : malloc(pages);
    int result = -1;
    if (vec && mincore(map, span, vec) == 0) {
        result = 1;
        for (uint64_t i = 0; i < pages; i++) if (!(vec[i] & 1)) { result = 0; break; }
    }
    if (vec && vec != stack) free(vec);
    munmap(map, span);
    return result;
}
