internal import CURing
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// One io_uring, owned by one thread of its own.
///
/// Any thread may `submit`: the operation is queued under a lock and the ring
/// thread is woken through an eventfd, on which the ring always has a read
/// outstanding. So the ring thread sleeps in one place (`io_uring_enter`),
/// whether it waits for the disk or for new work, and everything queued
/// while it was busy goes to the kernel in one `io_uring_submit`: a fill's
/// write, the follower-waking event loops' next writes and another fill's
/// fsync share one system call.
///
/// Only the ring thread touches the ring (liburing is not thread-safe), and
/// completions run on it: they must be short (fulfil a promise, resume a
/// continuation) and must not block.
public final class URing: @unchecked Sendable {
    /// What the ring can do for the storage layer. Paths are absolute (or
    /// relative to the working directory: `AT_FDCWD`).
    public enum Operation: @unchecked Sendable {
        /// `bytes` must stay valid until the completion runs: the caller
        /// keeps the buffer alive in its completion closure.
        case write(fd: Int32, bytes: UnsafeRawPointer, count: Int, offset: UInt64)
        case fsync(fd: Int32)
        case openat(path: String, flags: Int32, mode: UInt32)
        case renameat(from: String, to: String)
        case unlinkat(path: String)
        case close(fd: Int32)
        /// An extended attribute, `value` without a terminating NUL.
        case fsetxattr(fd: Int32, name: String, value: String)
    }

    /// Called on the ring thread with the operation's result: the kernel's
    /// `res` (bytes, a descriptor, 0) or a negative errno.
    public typealias Completion = @Sendable (Int32) -> Void

    private struct Queued {
        var operation: Operation
        var completion: Completion
    }

    /// What the ring thread keeps for an operation in the kernel's hands:
    /// its completion and the C strings its paths were copied to.
    private struct InFlight {
        var completion: Completion
        var strings: [UnsafeMutablePointer<CChar>]
    }

    private struct Shared {
        var queue: [Queued] = []
        var stopping = false
        var shutDown = false
        /// The most operations the kernel held at once (for tests and
        /// diagnostics: it never exceeds `maxInFlight`).
        var peakInFlight = 0
    }

    /// The `io_uring`, untyped: no declaration of this module may name a
    /// CURing type (only function bodies may), or every client would load
    /// CURing's headers, and with them the clash this module exists to
    /// avoid. Each function binds it where it needs it.
    private let storage: UnsafeMutableRawPointer
    private let wakeFD: Int32
    /// Where the ring's read of the eventfd lands.
    private let wakeCount: UnsafeMutablePointer<UInt64>
    private let shared = NIOLockedValueBox(Shared())
    private var thread = pthread_t()
    /// The ring was set up disabled; the ring thread enables it first.
    private let enableOnThread: Bool
    // Ring thread only:
    private var inFlight: [UInt64: InFlight] = [:]
    /// Operations the kernel may still hold after the ring failed.
    private var abandoned: [InFlight] = []
    private var nextID: UInt64 = 1
    /// Whether the eventfd read is in the ring (or about to be submitted).
    private var armed = true
    private static let wakeID: UInt64 = 0
    /// Operations the ring thread hands the kernel at once: one submission
    /// slot is the eventfd read's, the rest are for work. Bounding what is
    /// in flight to what the rings hold means a submission slot is always
    /// free and the completion ring (twice the size) never overflows: the
    /// kernel never answers -EBUSY, and nothing waits in a loop. More work
    /// than that stays queued until completions make room.
    public let maxInFlight: Int

    /// Sets up a ring of `entries` submission slots and starts its thread.
    /// Throws the errno `io_uring_queue_init` failed with: EPERM when a
    /// seccomp filter denies `io_uring_setup` (Docker's default profile) or
    /// `kernel.io_uring_disabled` is set, ENOSYS without kernel support.
    public init(entries: UInt32 = 256) throws(URingError) {
        maxInFlight = max(1, Int(entries) - 1)
        let typed = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        typed.initialize(to: io_uring())
        storage = UnsafeMutableRawPointer(typed)
        // Only the ring thread submits, and it reaps only when it enters
        // the kernel anyway: SINGLE_ISSUER + DEFER_TASKRUN (Linux 6.1) let
        // the kernel run completions in that thread's own io_uring_enter
        // instead of interrupting it. The ring starts disabled, so that the
        // ring thread (which enables it) becomes its one issuer. Older
        // kernels refuse the flags: plain ring then.
        var flags = UInt32(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED)
        var result = io_uring_queue_init(entries, typed, flags)
        if result == -EINVAL {
            flags = 0
            result = io_uring_queue_init(entries, typed, 0)
        }
        enableOnThread = flags != 0
        guard result == 0 else {
            typed.deallocate()
            throw URingError(errno: -result, during: "io_uring_queue_init")
        }
        // A kernel with io_uring but without one of the operations the cache
        // needs (fsetxattr arrived in 5.19, renameat/unlinkat in 5.11) would
        // fail every publish: treat it as no ring at all.
        if let missing = Self.missingOperation(typed) {
            io_uring_queue_exit(typed)
            typed.deallocate()
            throw URingError(errno: EOPNOTSUPP, during: "this kernel's io_uring lacks \(missing)")
        }
        wakeFD = eventfd(0, Int32(EFD_CLOEXEC))
        guard wakeFD >= 0 else {
            let error = errno
            io_uring_queue_exit(typed)
            typed.deallocate()
            throw URingError(errno: error, during: "eventfd")
        }
        wakeCount = .allocate(capacity: 1)
        wakeCount.initialize(to: 0)
        armWake()
        let unmanaged = Unmanaged.passRetained(self)
        let created = pthread_create(&thread, nil, { argument in
            guard let argument else { return nil }
            let ring = Unmanaged<URing>.fromOpaque(argument).takeRetainedValue()
            ring.loop()
            return nil
        }, unmanaged.toOpaque())
        guard created == 0 else {
            unmanaged.release()
            close(wakeFD)
            io_uring_queue_exit(typed)
            typed.deallocate()
            wakeCount.deallocate()
            throw URingError(errno: created, during: "pthread_create")
        }
    }

    /// The first operation the cache needs that the kernel's ring lacks.
    private static func missingOperation(_ ring: UnsafeMutableRawPointer) -> String? {
        guard let probe = io_uring_get_probe_ring(ring.assumingMemoryBound(to: io_uring.self)) else {
            return "a probe of its operations"
        }
        defer { io_uring_free_probe(probe) }
        let needed: [(Int32, String)] = [
            (Int32(IORING_OP_WRITE.rawValue), "write"), (Int32(IORING_OP_FSYNC.rawValue), "fsync"),
            (Int32(IORING_OP_OPENAT.rawValue), "openat"), (Int32(IORING_OP_CLOSE.rawValue), "close"),
            (Int32(IORING_OP_RENAMEAT.rawValue), "renameat"), (Int32(IORING_OP_UNLINKAT.rawValue), "unlinkat"),
            (Int32(IORING_OP_FSETXATTR.rawValue), "fsetxattr"), (Int32(IORING_OP_READ.rawValue), "read"),
        ]
        return needed.first { io_uring_opcode_supported(probe, $0.0) == 0 }?.1
    }

    /// The most operations in the kernel's hands at once so far.
    public var peakInFlight: Int { shared.withLockedValue { $0.peakInFlight } }

    /// Hands an operation to the ring. After `shutdown` it completes at once
    /// with `-ECANCELED`.
    public func submit(_ operation: Operation, completion: @escaping Completion) {
        // The wake-up is written under the lock: `shutdown` closes the
        // eventfd under it, so a late submitter can never write to a
        // descriptor number that has been reused meanwhile.
        let accepted = shared.withLockedValue { shared -> Bool in
            guard !shared.stopping else { return false }
            shared.queue.append(Queued(operation: operation, completion: completion))
            wake()
            return true
        }
        guard accepted else { return completion(-ECANCELED) }
    }

    /// Stops taking operations, lets those in the kernel complete, and joins
    /// the ring thread. Operations submitted afterwards fail with ECANCELED.
    public func shutdown() {
        let first = shared.withLockedValue { shared -> Bool in
            defer { shared.shutDown = true }
            guard !shared.shutDown else { return false }
            shared.stopping = true
            wake()
            return true
        }
        guard first else { return }
        pthread_join(thread, nil)
        shared.withLockedValue { _ in _ = close(wakeFD) }
        let ring = storage.assumingMemoryBound(to: io_uring.self)
        io_uring_queue_exit(ring)
        ring.deallocate()
        wakeCount.deallocate()
    }

    private func wake() {
        var one: UInt64 = 1
        while write(wakeFD, &one, 8) < 0 && errno == EINTR {}
    }

    // MARK: ring thread

    private func loop() {
        if enableOnThread {
            let enabled = cacheproxy_enable_rings(storage.assumingMemoryBound(to: io_uring.self).pointee.ring_fd)
            if enabled < 0 {
                failAll(enabled)
                return
            }
        }
        var refusals = 0
        while true {
            let stopping = takeQueued()
            if stopping && inFlight.isEmpty { return }
            let ring = storage.assumingMemoryBound(to: io_uring.self)
            let submitted = io_uring_submit_and_wait(ring, 1)
            if submitted < 0 && submitted != -EINTR && submitted != -EAGAIN && submitted != -EBUSY {
                failAll(submitted)
                return
            }
            let reaped = reap()
            if !armed {
                // The eventfd read could not be put back: new work would
                // never be noticed. Fail everything rather than hang it.
                failAll(-EBUSY)
                return
            }
            // -EBUSY/-EAGAIN with nothing to reap would loop at full speed:
            // back off, and after a second of it give the ring up (every
            // operation fails, fills go on from memory).
            if submitted == -EAGAIN || submitted == -EBUSY, reaped == 0 {
                refusals += 1
                if refusals > 1000 {
                    failAll(submitted)
                    return
                }
                usleep(1000)
            } else {
                refusals = 0
            }
        }
    }

    /// Moves the queued operations into submission slots. Returns whether
    /// the ring is stopping (then the eventfd read is left unarmed once it
    /// completes, so the loop can end when nothing is in flight).
    private func takeQueued() -> Bool {
        let room = maxInFlight - inFlight.count
        let (queued, stopping) = shared.withLockedValue { [inFlight] shared -> ([Queued], Bool) in
            let taken = Array(shared.queue.prefix(max(0, room)))
            shared.queue.removeFirst(taken.count)
            shared.peakInFlight = max(shared.peakInFlight, inFlight.count + taken.count)
            return (taken, shared.stopping)
        }
        for item in queued {
            guard let slot = nextSQE() else {
                // The kernel refused the submission that would have freed a
                // slot (it should not, with in-flight work bounded): the
                // operation fails, and its caller goes on without the disk.
                item.completion(-EBUSY)
                continue
            }
            let sqe = slot.assumingMemoryBound(to: io_uring_sqe.self)
            let id = nextID
            nextID += 1
            var strings: [UnsafeMutablePointer<CChar>] = []
            func cString(_ string: String) -> UnsafeMutablePointer<CChar> {
                let copy = strdup(string)!  // strdup fails only when out of memory
                strings.append(copy)
                return copy
            }
            switch item.operation {
            case .write(let fd, let bytes, let count, let offset):
                io_uring_prep_write(sqe, fd, bytes, UInt32(clamping: count), offset)
            case .fsync(let fd):
                io_uring_prep_fsync(sqe, fd, 0)
            case .openat(let path, let flags, let mode):
                io_uring_prep_openat(sqe, AT_FDCWD, cString(path), flags, mode)
            case .renameat(let from, let to):
                io_uring_prep_renameat(sqe, AT_FDCWD, cString(from), AT_FDCWD, cString(to), 0)
            case .unlinkat(let path):
                io_uring_prep_unlinkat(sqe, AT_FDCWD, cString(path), 0)
            case .close(let fd):
                io_uring_prep_close(sqe, fd)
            case .fsetxattr(let fd, let name, let value):
                io_uring_prep_fsetxattr(sqe, fd, cString(name), cString(value), 0, UInt32(value.utf8.count))
            }
            io_uring_sqe_set_data64(sqe, id)
            inFlight[id] = InFlight(completion: item.completion, strings: strings)
        }
        return stopping
    }

    /// A free submission slot; when all are taken, what is in them goes to
    /// the kernel first. Nil when the kernel will not take them now
    /// (-EBUSY, -EAGAIN): never a loop around a refusal.
    private func nextSQE() -> UnsafeMutableRawPointer? {
        let ring = storage.assumingMemoryBound(to: io_uring.self)
        for _ in 0..<3 {
            if let sqe = io_uring_get_sqe(ring) { return UnsafeMutableRawPointer(sqe) }
            var submitted: Int32
            repeat { submitted = io_uring_submit(ring) } while submitted == -EINTR
            if submitted < 0 { return nil }
        }
        return nil
    }

    /// Runs the completions that are in; returns how many there were.
    @discardableResult
    private func reap() -> Int {
        let ring = storage.assumingMemoryBound(to: io_uring.self)
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        var count = 0
        while io_uring_peek_cqe(ring, &cqe) == 0, let entry = cqe {
            count += 1
            let (id, result) = (io_uring_cqe_get_data64(entry), entry.pointee.res)
            io_uring_cqe_seen(ring, entry)
            if id == Self.wakeID {
                if !shared.withLockedValue({ $0.stopping }) { armWake() }
                continue
            }
            guard let done = inFlight.removeValue(forKey: id) else { continue }
            for string in done.strings { free(string) }
            done.completion(result)
        }
        return count
    }

    private func armWake() {
        // A slot is kept for this read (`maxInFlight`), so there is one; if
        // the kernel still refused, the loop sees `armed` false.
        guard let sqe = nextSQE()?.assumingMemoryBound(to: io_uring_sqe.self) else {
            armed = false
            return
        }
        armed = true
        io_uring_prep_read(sqe, wakeFD, wakeCount, 8, 0)
        io_uring_sqe_set_data64(sqe, Self.wakeID)
    }

    /// The ring itself failed (it should not): every operation still waiting
    /// fails with that error rather than hanging its caller. What the
    /// kernel may still be reading (paths, write buffers held by the
    /// completions) is kept, leaked, for the life of the process.
    private func failAll(_ error: Int32) {
        shared.withLockedValue { $0.stopping = true }
        // What was in flight may have reached the kernel: its callers must
        // not take the error for "never submitted" (ECANCELED, EBUSY,
        // EAGAIN), on which a close is redone by hand.
        let inFlightError = [-ECANCELED, -EBUSY, -EAGAIN].contains(error) ? -EIO : error
        for (_, done) in inFlight {
            done.completion(inFlightError)
        }
        abandoned = Array(inFlight.values)
        inFlight.removeAll()
        let queued = shared.withLockedValue { shared -> [Queued] in
            defer { shared.queue.removeAll() }
            return shared.queue
        }
        for item in queued { item.completion(-ECANCELED) }
    }
}

/// Why a ring could not be set up: the errno and the call that gave it.
public struct URingError: Error, CustomStringConvertible, Sendable {
    public let errno: Int32
    public let during: String

    public init(errno: Int32, during: String) {
        self.errno = errno
        self.during = during
    }

    public var description: String { "\(during): \(String(cString: strerror(errno)))" }
}
