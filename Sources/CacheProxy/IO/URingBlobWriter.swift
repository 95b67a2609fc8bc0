import IOURing
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The storage calls on an io_uring (`IOURing.URing`): submitted from any
/// thread, completed on the ring's own thread, which fulfils a NIO promise
/// on one of the event loops.
///
/// Why the ring pays: the thread pool costs two thread hand-offs and a
/// blocking syscall per write; the ring takes everything queued since its
/// last wake-up in one `io_uring_enter`, the writes of all fills in flight
/// together, and the kernel completes them without a thread of ours
/// blocked on each.
public final class URingBlobWriter: BlobWriter {
    private let ring: URing
    private let group: any EventLoopGroup
    public var backendName: String { "io_uring" }

    public init(ring: URing, group: any EventLoopGroup) {
        self.ring = ring
        self.group = group
    }

    /// Submits one operation; `what` names it in an error.
    private func run(_ operation: URing.Operation, _ what: @autoclosure () -> String,
                     keeping buffer: ByteBuffer? = nil) async throws -> Int32 {
        let promise = group.any().makePromise(of: Int32.self)
        ring.submit(operation) { result in
            // The write's bytes are the buffer's: it lives until the kernel is done.
            withExtendedLifetime(buffer) { promise.succeed(result) }
        }
        let result = try await promise.futureResult.get()
        guard result >= 0 else { throw StoreError.system(what(), -result) }
        return result
    }

    public func open(_ path: String, flags: CInt, mode: mode_t) async throws -> CInt {
        try await run(.openat(path: path, flags: flags, mode: mode), "open \(path)")
    }

    public func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws {
        var remaining = buffer
        var at = offset
        while remaining.readableBytes > 0 {
            // The pointer outlives the closure: `run` keeps `remaining`'s
            // storage alive (and unmodified) until the completion.
            let (base, count) = remaining.withUnsafeReadableBytes { ($0.baseAddress, $0.count) }
            guard let base else { return }
            let written = try await run(.write(fd: fd, bytes: base, count: count, offset: UInt64(at)), "write",
                                        keeping: remaining)
            guard written > 0 else { throw StoreError.system("write", EIO) }
            remaining.moveReaderIndex(forwardBy: Int(written))
            at += Int64(written)
        }
    }

    public func sync(_ fd: CInt) async throws {
        _ = try await run(.fsync(fd: fd), "fsync")
    }

    public func rename(_ from: String, to: String) async throws {
        _ = try await run(.renameat(from: from, to: to), "rename to \(to)")
    }

    public func unlink(_ path: String) async throws {
        _ = try await run(.unlinkat(path: path), "unlink \(path)")
    }

    public func close(_ fd: CInt) async {
        do {
            _ = try await run(.close(fd: fd), "close")
        } catch StoreError.system(_, let code) where code == ECANCELED || code == EBUSY || code == EAGAIN {
            // The close never reached the kernel (the ring has stopped, or
            // refused the submission): the descriptor must not leak. Any
            // other error came from the kernel's close, which released the
            // number already: closing it again could close a reused one.
            _ = Glibc.close(fd)
        } catch {}
    }

    public func setAttribute(_ name: String, to value: String, on fd: CInt) async throws {
        _ = try await run(.fsetxattr(fd: fd, name: name, value: value), "fsetxattr")
    }

    public func shutdown() {
        ring.shutdown()
    }
}
