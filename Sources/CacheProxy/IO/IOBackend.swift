import IOURing
import NIOPosix
import Logging

/// Probes io_uring once at start. `io_uring_queue_init` fails with EPERM
/// under a seccomp profile that denies it (Docker's default) or with
/// `kernel.io_uring_disabled=2`, and with ENOSYS on kernels without it.
public enum IOBackend {
    /// The fill writes through the thread pool in this version; the probe is
    /// logged so operators see whether the io_uring backend will be usable.
    public static func select(pool: NIOThreadPool, logger: Logger) -> BlobWriter {
        let probe = URingProbe.probe()
        if probe == 0 {
            logger.info("io_uring is available; this version writes blobs through the thread pool")
        } else {
            logger.notice("io_uring unavailable (\(probe)); writing blobs through the thread pool")
        }
        return ThreadPoolBlobWriter(pool: pool)
    }
}

