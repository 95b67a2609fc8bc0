import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Where a fill's bytes go to disk. A protocol so that the io_uring backend
/// (DESIGN.md, Sources/CURing) slots in beside the thread-pool one without
/// the fill changing.
public protocol BlobWriter: Sendable {
    var backendName: String { get }
    func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws
    func sync(_ fd: CInt) async throws
}

/// `pwrite`/`fsync` on NIO's blocking-IO thread pool, so that a slow disk
/// never stalls an event loop or the cooperative pool.
public struct ThreadPoolBlobWriter: BlobWriter {
    let pool: NIOThreadPool
    public var backendName: String { "threadpool" }

    public init(pool: NIOThreadPool) { self.pool = pool }

    public func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws {
        try await pool.runIfActive {
            var written = 0
            try buffer.withUnsafeReadableBytes { bytes in
                while written < bytes.count {
                    let n = pwrite(fd, bytes.baseAddress! + written, bytes.count - written, off_t(offset) + off_t(written))
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw StoreError.system("write", errno)
                    }
                    written += n
                }
            }
        }
    }

    public func sync(_ fd: CInt) async throws {
        try await pool.runIfActive {
            if fsync(fd) != 0 { throw StoreError.system("fsync", errno) }
        }
    }
}
