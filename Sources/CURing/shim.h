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
