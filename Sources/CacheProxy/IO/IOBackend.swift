import IOURing
import Logging
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Picks the storage backend once, at start.
public enum IOBackend {
    /// `auto` takes io_uring when a ring can be set up here and falls back
    /// to the thread pool, saying why once, when it cannot: EPERM under a
    /// seccomp profile that denies `io_uring_setup` (Docker's default) or
    /// with `kernel.io_uring_disabled`, ENOSYS on a kernel without it.
    /// Asked for by name, io_uring that cannot start is an error: an
    /// operator who chose it wants to know.
    public static func select(_ choice: ProxyConfig.IOBackendChoice, pool: NIOThreadPool,
                              group: any EventLoopGroup, logger: Logger) throws -> any BlobWriter {
        switch choice {
        case .threadpool:
            logger.info("storage backend: threadpool (configured)")
            return ThreadPoolBlobWriter(pool: pool, group: group)
        case .ioUring, .auto:
            do {
                let ring = try URing()
                logger.info("storage backend: io_uring")
                return URingBlobWriter(ring: ring, group: group)
            } catch {
                guard choice == .auto else { throw IOBackendError(reason: "\(error)") }
                logger.notice("io_uring unavailable; storage backend: threadpool",
                              metadata: ["reason": "\(error)"])
                return ThreadPoolBlobWriter(pool: pool, group: group)
            }
        }
    }
}

public struct IOBackendError: Error, CustomStringConvertible {
    public let reason: String
    public var description: String {
        "storage.io_backend is io_uring, but no ring can be set up here (\(reason)); use auto or threadpool"
    }
}
