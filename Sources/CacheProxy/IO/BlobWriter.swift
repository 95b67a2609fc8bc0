import IOURing
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Everything the cache does to its disk: a fill's temporary file, its
/// writes and fsync, the rename that publishes it, the directory fsync that
/// makes the rename durable, and the unlinks of failed fills and evicted
/// blobs. A protocol so that the io_uring backend and the thread-pool one
/// are interchangeable, and neither ever runs a blocking call on an event
/// loop or on the cooperative pool.
///
/// Errors are `StoreError.system` with the errno, so that a fill can tell a
/// full disk (ENOSPC) from a broken one (EIO) in its metrics.
public protocol BlobWriter: Sendable {
    /// `io_uring` or `threadpool`, as `cacheproxy_io_backend` names it.
    var backendName: String { get }
    func open(_ path: String, flags: CInt, mode: mode_t) async throws -> CInt
    /// Writes all of `buffer` at `offset`.
    func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws
    func sync(_ fd: CInt) async throws
    func rename(_ from: String, to: String) async throws
    func unlink(_ path: String) async throws
    func close(_ fd: CInt) async
    /// Sets an extended attribute (`user.…`) on an open file.
    func setAttribute(_ name: String, to value: String, on fd: CInt) async throws
    /// Ends the backend's own threads (the ring's); later calls fail.
    func shutdown()
}

extension BlobWriter {
    /// A new file (`O_EXCL`: never someone else's) for reading and writing.
    func create(_ path: String) async throws -> CInt {
        try await open(path, flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o644)
    }

    /// fsync of a directory, so that a rename into it survives a power loss.
    func syncDirectory(_ path: String) async throws {
        let fd = try await open(path, flags: O_RDONLY | O_DIRECTORY | O_CLOEXEC, mode: 0)
        do {
            try await sync(fd)
        } catch {
            await close(fd)
            throw error
        }
        await close(fd)
    }
}

/// The blocking calls on NIO's thread pool, so that a slow disk never stalls
/// an event loop or the cooperative pool.
///
/// Through the future-returning `runIfActive`, not the async one: the async
/// one skips the work when the calling task is cancelled, and a fill that is
/// cancelled at the shutdown deadline must still delete its temporary file.
public struct ThreadPoolBlobWriter: BlobWriter {
    let pool: NIOThreadPool
    let group: any EventLoopGroup
    public var backendName: String { "threadpool" }

    public init(pool: NIOThreadPool, group: any EventLoopGroup) {
        self.pool = pool
        self.group = group
    }

    private func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await pool.runIfActive(eventLoop: group.any(), body).get()
    }

    public func open(_ path: String, flags: CInt, mode: mode_t) async throws -> CInt {
        try await run {
            let fd = Glibc.open(path, flags, mode)
            guard fd >= 0 else { throw StoreError.system("open \(path)", errno) }
            return fd
        }
    }

    public func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws {
        try await run {
            var written = 0
            try buffer.withUnsafeReadableBytes { bytes in
                guard let base = bytes.baseAddress else { return }
                while written < bytes.count {
                    let n = pwrite(fd, base + written, bytes.count - written, off_t(offset) + off_t(written))
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
        try await run {
            if fsync(fd) != 0 { throw StoreError.system("fsync", errno) }
        }
    }

    public func rename(_ from: String, to: String) async throws {
        try await run {
            if Glibc.rename(from, to) != 0 { throw StoreError.system("rename to \(to)", errno) }
        }
    }

    public func unlink(_ path: String) async throws {
        try await run {
            if Glibc.unlink(path) != 0 { throw StoreError.system("unlink \(path)", errno) }
        }
    }

    public func close(_ fd: CInt) async {
        // close(2) does not block on a regular file: no hop needed.
        _ = Glibc.close(fd)
    }

    public func setAttribute(_ name: String, to value: String, on fd: CInt) async throws {
        try await run {
            let result = FileAttributes.set(name, to: value, on: fd)
            if result != 0 { throw StoreError.system("fsetxattr", result) }
        }
    }

    public func shutdown() {}
}
