// Umbrella header for liburing. <features.h> must come first: without it,
// every Swift file that also imports Glibc fails with "'__fds_bits' ... is
// not present in definition of 'fd_set'" (see DESIGN.md, facts checked).
#include <features.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/xattr.h>
