internal import CURing

/// The Swift side of `CURing`, in a module of its own: liburing ships its own
/// copy of `<linux/io_uring.h>`, which clashes with the one swift-system's
/// `CSystem` (pulled in by NIO) includes, so no module may import both.
/// Everything the proxy needs from the ring goes through this module's API.
public enum URingProbe {
    /// 0 when a ring can be set up here, else the negative errno that
    /// `io_uring_queue_init` gave (-EPERM under a seccomp filter that denies
    /// `io_uring_setup` or with `kernel.io_uring_disabled=2`, -ENOSYS without
    /// kernel support).
    public static func probe() -> Int32 {
        var ring = io_uring()
        let result = io_uring_queue_init(8, &ring, 0)
        if result == 0 { io_uring_queue_exit(&ring) }
        return result
    }
}
