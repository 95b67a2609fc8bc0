import AsyncHTTPClient
import DequeModule
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import ProxyMetrics
#if canImport(Glibc)
import Glibc
#endif

/// What a follower needs to answer its client once the upstream has said 200.
public struct BlobHead: Sendable, Equatable {
    public var contentLength: Int64?
    public var contentType: String?
}

/// A non-200 upstream answer (401, 404, 429, 5xx), handed to the client that
/// asked, with a bounded body: these are small JSON errors.
public struct UpstreamAnswer: Sendable {
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: ByteBuffer
}

/// What a follower sees of a fill at one moment.
public struct FillSnapshot: Sendable {
    public let state: FillStateMachine.State
    /// Bytes of the file a follower may send now (see `followerMark`).
    public let mark: Int64
    public let head: BlobHead?
    public let answer: UpstreamAnswer?
    /// Bytes below this offset are in the file; above it, in the fill's
    /// memory window (`Int64.max` while the disk works).
    public let fileEnd: Int64
}

/// Everything a fill needs from the rest of the proxy.
struct FillContext: Sendable {
    let client: UpstreamClient
    let store: BlobStore
    /// Told of the upstream's yes once the bytes it vouched for verified.
    let gate: AccessGate
    let metrics: ProxyMetrics
    let logger: Logger
    var writer: any BlobWriter { store.writer }
}

/// One upstream download of one digest, however many clients want it.
///
/// The fill writes to a temporary file and hashes as it goes; clients follow
/// the growing file (see `BlobResponder`), so a slow client never slows the
/// download, and a client that goes away does not stop it. Only when the
/// disk fails do they read the fill's bounded memory window instead, and
/// then the slowest of them sets the download's pace.
public final class Fill: Sendable {
    public let digest: Digest
    /// A blob or a manifest: which registry path the fill asks, and whether
    /// the upstream's media type is kept with the file.
    let kind: ContentKind
    let upstream: ProxyConfig.Upstream
    let repository: String
    let requestHeaders: HTTPHeaders

    private struct Inner {
        var machine: FillStateMachine
        var head: BlobHead?
        var answer: UpstreamAnswer?
        /// A read-only descriptor of the temporary file; followers `dup` it,
        /// so a follower can keep reading after the rename (same inode).
        var readFD: CInt = -1
        var waiters: [Waiter] = []
        /// Followers whose client went away: their waits end at once.
        var abandoned: Set<Int> = []
        var nextFollower = 0
        /// The followers registered now, each with the bytes it still needs
        /// (from its position to the end of its range). A close that arrives
        /// after its follower left must not leave a mark behind.
        var needs: [Int: Range<Int64>] = [:]
        /// Until the first follower registers, every byte is needed.
        var everFollowed: Bool { nextFollower > 0 }
        var window = MemoryWindow()
        var fileEnd: Int64 = .max
        var storageError: (any Error)?
        /// The fill, waiting for followers to make room in the window.
        var roomWaiter: CheckedContinuation<Void, Never>?
        /// The upstream's download bound, while the fill waits for a slot:
        /// the last follower to leave withdraws the wait.
        var slots: FillSlots?
        /// The upstream's answer was its own yes to the client that
        /// started the fill (`UpstreamClient.BlobAnswer.vouches`).
        var vouched = false
        /// The fill ended because no client wanted it any more (it left the
        /// slot queue, or gave its slot to a fill someone waits for): a
        /// request that joined it just then asks again.
        var withdrawn = false

        /// Whether no client wants the fill any more (before the first
        /// follower registers, the one that started it is on its way).
        var isUnwanted: Bool { everFollowed && needs.isEmpty }

        var snapshot: FillSnapshot {
            FillSnapshot(state: machine.state, mark: machine.followerMark, head: head, answer: answer,
                         fileEnd: fileEnd)
        }

        mutating func advance(_ follower: Int, to position: Int64) -> CheckedContinuation<Void, Never>? {
            guard let need = needs[follower], position > need.lowerBound else { return nil }
            needs[follower] = min(position, need.upperBound)..<need.upperBound
            return takeRoomWaiter()
        }

        mutating func takeRoomWaiter() -> CheckedContinuation<Void, Never>? {
            defer { roomWaiter = nil }
            return roomWaiter
        }

        /// A wait is over when followers may send more than `after` bytes,
        /// or when the fill has settled (verified or ended): an empty blob
        /// never moves the mark, and a follower holding back the last byte
        /// of its range waits for the digest, not for more bytes.
        func isReady(after mark: Int64) -> Bool {
            machine.followerMark > mark || machine.isSettled
        }
    }

    struct Waiter {
        let follower: Int
        let after: Int64
        let continuation: CheckedContinuation<FillSnapshot, Never>
    }

    private let inner: NIOLockedValueBox<Inner>

    init(digest: Digest, kind: ContentKind = .blob, upstream: ProxyConfig.Upstream, repository: String,
         requestHeaders: HTTPHeaders, holdBack: Int64) {
        self.digest = digest
        self.kind = kind
        self.upstream = upstream
        self.repository = repository
        self.requestHeaders = requestHeaders
        self.inner = NIOLockedValueBox(Inner(machine: FillStateMachine(holdBack: holdBack)))
    }

    // MARK: follower side

    /// Registers a follower for the time of `body`. A client that goes away
    /// ends its follower's waits at once, so the follower releases its
    /// descriptor without waiting for the fill to move (which, on a stalled
    /// upstream, may be a long time).
    func withFollower<T>(closing watch: CloseWatch, _ body: (Int) async throws -> T) async rethrows -> T {
        let id = inner.withLockedValue { inner -> Int in
            inner.nextFollower += 1
            inner.needs[inner.nextFollower] = 0..<Int64.max
            return inner.nextFollower
        }
        // A fill waiting for its first follower before trimming may go on.
        inner.withLockedValue { $0.takeRoomWaiter() }?.resume()
        let token = watch.onClose { [weak self] in self?.abandon(id) }
        defer {
            watch.cancel(token)
            let (waiter, slots) = inner.withLockedValue { inner in
                inner.abandoned.remove(id)
                inner.needs[id] = nil
                return (inner.takeRoomWaiter(), inner.isUnwanted ? inner.slots : nil)
            }
            waiter?.resume()
            slots?.withdraw(slotID)
        }
        return try await body(id)
    }

    func abandon(_ follower: Int) {
        let (woken, snapshot) = inner.withLockedValue { inner -> ([CheckedContinuation<FillSnapshot, Never>], FillSnapshot) in
            guard inner.needs[follower] != nil else { return ([], inner.snapshot) }
            inner.abandoned.insert(follower)
            var woken: [CheckedContinuation<FillSnapshot, Never>] = []
            inner.waiters.removeAll { waiter in
                guard waiter.follower == follower else { return false }
                woken.append(waiter.continuation)
                return true
            }
            return (woken, inner.snapshot)
        }
        for continuation in woken { continuation.resume(returning: snapshot) }
    }

    /// Returns as soon as the fill has moved past `mark` bytes, settled, or
    /// the follower's client went away (the caller checks its channel).
    /// Pass -1 to wait for the upstream's answer. `position` is the first
    /// byte the follower still needs: bytes below it may leave the memory
    /// window.
    public func next(after mark: Int64, follower: Int, position: Int64 = 0) async -> FillSnapshot {
        await withCheckedContinuation { continuation in
            let (ready, room): (FillSnapshot?, CheckedContinuation<Void, Never>?) = inner.withLockedValue { inner in
                let room = inner.advance(follower, to: position)
                if inner.isReady(after: mark) || inner.abandoned.contains(follower) { return (inner.snapshot, room) }
                inner.waiters.append(Waiter(follower: follower, after: mark, continuation: continuation))
                return (nil, room)
            }
            room?.resume()
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// A follower no longer needs the bytes below `position`.
    func reached(_ position: Int64, follower: Int) {
        inner.withLockedValue { $0.advance(follower, to: position) }?.resume()
    }

    /// A follower will need no byte at or past `end` (the end of its range).
    func needs(upTo end: Int64, follower: Int) {
        inner.withLockedValue { inner -> CheckedContinuation<Void, Never>? in
            guard let need = inner.needs[follower], end < need.upperBound else { return nil }
            inner.needs[follower] = need.lowerBound..<max(need.lowerBound, end)
            return inner.takeRoomWaiter()
        }?.resume()
    }

    /// Whether a follower starting at `offset` finds every byte it needs:
    /// not when the disk failed and bytes it needs have left the memory
    /// window before it registered (it then asks again, for a fill of its
    /// own). Called once registered, so nothing it needs leaves afterwards.
    func holds(from offset: Int64) -> Bool {
        inner.withLockedValue { $0.window.holds(from: offset, fileEnd: $0.fileEnd) }
    }

    /// Bytes from the memory window, starting at `offset`, at most up to
    /// `end` (one batch at most); nil if they are no longer there.
    func memoryBytes(from offset: Int64, upTo end: Int64) -> ByteBuffer? {
        inner.withLockedValue { $0.window.bytes(from: offset, upTo: end) }
    }

    /// The memory window's bytes, and the memory its buffers take.
    var windowMemory: (bytes: Int, retained: Int) {
        inner.withLockedValue { ($0.window.bytes, $0.window.retained) }
    }

    /// Whether a new request may follow this fill from its first byte: not
    /// once bytes that never reached the disk have left the memory window.
    var isJoinable: Bool {
        inner.withLockedValue { !$0.withdrawn && $0.window.holds(from: 0, fileEnd: $0.fileEnd) }
    }

    enum Reader {
        /// A descriptor of the file being filled, owned by the caller.
        case file(CInt)
        /// The fill has no file (the disk failed at once): memory only.
        case memory
        /// The fill is over: the blob is either in the store or gone.
        case over
        /// `dup` failed (EMFILE under fd pressure): retry later.
        case unavailable(Int32)
    }

    /// A descriptor of the file being filled; followers `dup` the fill's own,
    /// so they keep reading after the rename (same inode).
    func openReader() -> Reader {
        inner.withLockedValue { inner -> Reader in
            if inner.readFD < 0 && inner.fileEnd == 0 && !inner.machine.isFinished { return .memory }
            guard inner.readFD >= 0 else { return .over }
            let fd = dup(inner.readFD)
            return fd >= 0 ? .file(fd) : .unavailable(errno)
        }
    }

    public var state: FillStateMachine.State { inner.withLockedValue { $0.machine.state } }

    /// Whether the upstream said yes to the client that started this fill
    /// (its credentials are `requestHeaders`'), as a `HEAD` would have.
    var vouched: Bool { inner.withLockedValue { $0.vouched } }

    /// Whether the fill ended for want of clients, not for a failure.
    var wasWithdrawn: Bool { inner.withLockedValue { $0.withdrawn } }

    /// Whether the fill is still queued for a download slot: it has asked
    /// the upstream nothing yet.
    var isWaitingForSlot: Bool { inner.withLockedValue { $0.slots != nil } }

    /// Marks the fill as queued for one of `slots` from its creation, before
    /// its task runs (`FillRegistry`), so a `HEAD` that comes in between
    /// does not wait in the queue.
    func queue(on slots: FillSlots) {
        inner.withLockedValue { $0.slots = slots }
    }

    public var isFinished: Bool { inner.withLockedValue { $0.machine.isFinished } }

    // MARK: fill side

    /// Applies one event to the state machine and wakes the followers whose
    /// wait it ends; returns what the machine said to do.
    @discardableResult
    private func transition<Result>(_ body: (inout FillStateMachine) -> Result) -> Result {
        let (action, woken, snapshot): (Result, [CheckedContinuation<FillSnapshot, Never>], FillSnapshot) =
            inner.withLockedValue { inner in
                let action = body(&inner.machine)
                var woken: [CheckedContinuation<FillSnapshot, Never>] = []
                let (mark, settled) = (inner.machine.followerMark, inner.machine.isSettled)
                inner.waiters.removeAll { waiter in
                    guard mark > waiter.after || settled else { return false }
                    woken.append(waiter.continuation)
                    return true
                }
                if inner.machine.isFinished, inner.readFD >= 0 {
                    close(inner.readFD)
                    inner.readFD = -1
                }
                return (action, woken, inner.snapshot)
            }
        for continuation in woken { continuation.resume(returning: snapshot) }
        return action
    }

    /// Names this fill's wait in its upstream's `FillSlots`.
    private var slotID: Int { ObjectIdentifier(self).hashValue }

    /// Waits for one of the upstream's download slots; throws `busy` when
    /// none came in time (or the queue is full), and ends the fill quietly
    /// when every client left while it waited.
    private func takeSlot(_ slots: FillSlots, timeout: Duration) async throws {
        inner.withLockedValue { $0.slots = slots }
        let outcome = await slots.acquire(id: slotID, timeout: timeout) { [weak self] in
            self?.inner.withLockedValue { !$0.isUnwanted } ?? false
        }
        // A slot handed over by a fill that gave it up may come just as
        // this fill's own clients left too: then it passes on at once,
        // before any request goes upstream.
        let unwanted = inner.withLockedValue { inner -> Bool in
            inner.slots = nil
            let unwanted = outcome == .withdrawn || (outcome == .granted && inner.isUnwanted)
            if unwanted { inner.withdrawn = true }
            return unwanted
        }
        if unwanted && outcome == .granted { slots.release() }
        switch outcome {
        case _ where unwanted: throw Withdrawn()
        case .granted: return
        case .queueFull, .timedOut: throw UpstreamFailure.busy
        case .withdrawn: throw Withdrawn()
        }
    }

    /// The fill ends because no client wants it (`Inner.withdrawn`).
    struct Withdrawn: Error {}

    /// Gives the slot up when no client wants this download any more and
    /// another fill of the upstream waits for one: a client that leaves
    /// does not stop a fill (others may join it), but abandoned downloads
    /// must not keep the clients that are there waiting.
    private func yieldIfUnwanted(_ slots: FillSlots?) throws {
        guard let slots, slots.hasWaiters else { return }
        // Decided and marked at once: from here no request joins this fill
        // (`isJoinable`), and one that found it a moment ago asks again.
        let yields = inner.withLockedValue { inner -> Bool in
            guard inner.isUnwanted else { return false }
            inner.withdrawn = true
            return true
        }
        if yields { throw Withdrawn() }
    }

    /// Runs the download to its end. Never throws: every failure ends in the
    /// `failed` state with the temporary file deleted.
    func run(_ context: FillContext, slots: FillSlots? = nil) async {
        var holdsSlot = false
        defer { if holdsSlot { slots?.release() } }
        // The temporary file, whose descriptor closes on the way out; it is
        // deleted unless it became the cache entry.
        var temporary: (path: String, fd: CInt)?
        var published = false
        defer {
            if let temporary { close(temporary.fd) }
        }
        do {
            transition { $0.start() }
            if let slots {
                try await takeSlot(slots, timeout: context.client.answerTimeout)
                holdsSlot = true
            }
            var headers = requestHeaders
            // A manifest goes with what the client accepts
            // (`BlobResponder.upstreamHeaders`); a blob's type is no choice.
            if kind == .blob { headers.replaceOrAdd(name: "accept", value: "*/*") }
            let url = "\(upstream.origin)/v2/\(repository)/\(kind.pathSegment)/\(digest)"
            let answer: UpstreamClient.BlobAnswer
            do {
                answer = try await context.client.getBlob(url: url, headers: headers, upstream: upstream, digest: digest,
                                                          ownConnection: kind == .blob)
            } catch {
                context.metrics.upstreamAnswered(upstream, method: .GET, response: nil)
                throw error
            }
            let response = answer.response
            context.metrics.upstreamAnswered(upstream, method: .GET, response: response)
            let length = response.headers.first(name: "content-length").flatMap { Int64(digitsOnly: Substring($0)) }

            guard response.status == .ok else {
                // The status and headers are the answer (a 401's
                // `WWW-Authenticate` starts the client's token dance); a
                // body that stalls or is cut costs only the body.
                let body = (try? await UpstreamBody.collect(response.body, limit: 64 * 1024,
                                                           idle: context.client.idleTimeout,
                                                           total: context.client.answerTimeout)) ?? ByteBuffer()
                inner.withLockedValue {
                    $0.answer = UpstreamAnswer(status: response.status, headers: response.headers, body: body)
                }
                transition { $0.upstreamResponded(status: Int(response.status.code), contentLength: length) }
                return
            }

            // A disk that cannot take a new file (or a process out of
            // descriptors for reading it back) does not stop the clients:
            // the fill streams from memory instead (`BlobSink`).
            var file: (path: String, fd: CInt)?
            var readFD: CInt = -1
            do {
                file = try await context.store.makeTemporaryFile(for: digest)
                if let file { readFD = try await context.writer.open(file.path, flags: O_RDONLY | O_CLOEXEC, mode: 0) }
            } catch {
                if let created = file {
                    close(created.fd)
                    await context.store.discard(temporaryPath: created.path)
                    file = nil
                }
                storageFailed(error, fileEnd: 0)
            }
            temporary = file
            inner.withLockedValue {
                $0.readFD = readFD
                $0.vouched = answer.vouches
                $0.head = BlobHead(contentLength: length, contentType: response.headers.first(name: "content-type"))
            }
            transition { $0.upstreamResponded(status: 200, contentLength: length) }

            let (body, writer, fileFD) = (response.body, context.writer, file?.fd)
            let hex = try await UpstreamBody.read(idle: context.client.idleTimeout) { clock in
                var sink = BlobSink(writer: writer, fd: fileFD, fill: self, clock: clock,
                                    algorithm: self.digest.algorithm, expectedLength: length)
                do {
                    for try await chunk in body {
                        // An empty part is `FillDownload` telling of a
                        // pause: no byte came, so the clock does not move.
                        if chunk.readableBytes > 0 { clock.tick() }
                        try self.yieldIfUnwanted(slots)
                        try await sink.append(chunk)
                    }
                    return try await sink.finish()
                } catch {
                    await sink.abandon()
                    throw error
                }
            }
            if case .discard(let failure) = transition({ $0.upstreamEnded() }) { throw failure }
            if hex == digest.hex, answer.vouches {
                // The upstream's yes to the client that started the fill,
                // remembered only now that the bytes it said yes to are the
                // digest's, and before any follower is told they are: a
                // later hit with the same credentials needs no `HEAD`.
                context.gate.remember(upstream: upstream, headers: requestHeaders, repository: repository,
                                      digest: digest, kind: kind)
            }
            switch transition({ $0.digestChecked(matches: hex == digest.hex) }) {
            case .discard(let failure):
                throw failure
            case .release:
                break  // verified and served; nothing to keep (the file goes below)
            case .publish(let size):
                if let file, context.store.keeps(size: size) {
                    do {
                        let mediaType = kind == .manifest ? response.headers.first(name: "content-type") : nil
                        try await context.store.publish(temporary: file, digest: digest, size: size,
                                                        mediaType: mediaType)
                        published = true
                        transition { $0.publishSucceeded() }
                    } catch {
                        storageFailed(error, fileEnd: .max)
                        transition { $0.notKept() }
                    }
                } else {
                    transition { $0.notKept() }
                }
            case .none:
                break
            }
            if let file, !published {
                await context.store.discard(temporaryPath: file.path)
            }
            countStorageError(context)
            context.logger.debug("fill ended", metadata: ["digest": "\(digest)", "state": "\(state)"])
        } catch {
            let failure = (error as? FillStateMachine.Failure) ?? .upstream(String(describing: error))
            let withdrawn = error is Withdrawn
            inner.withLockedValue { $0.vouched = false }
            if failure == .digestMismatch { context.metrics.digestMismatches.increment() }
            if !withdrawn { context.metrics.fillFailures.increment() }
            countStorageError(context)
            if let temporary { await context.store.discard(temporaryPath: temporary.path) }
            // A fill that ended before its first byte is told to the clients
            // as an error of its own: 502/504 for an upstream that could not
            // be reached or did not answer in time.
            if state == .requesting {
                let oci = UpstreamClient.clientError(for: error)
                var headers: HTTPHeaders = ["content-type": "application/json"]
                if case UpstreamFailure.busy = error { headers.add(name: "retry-after", value: "5") }
                inner.withLockedValue {
                    $0.answer = UpstreamAnswer(status: oci.status, headers: headers, body: ByteBuffer(string: oci.body))
                }
            }
            transition { $0.fail(failure) }
            if withdrawn {
                context.logger.debug("fill withdrawn: no client wants it", metadata: ["digest": "\(digest)"])
            } else {
                context.logger.warning("fill failed", metadata: ["digest": "\(digest)", "error": "\(failure)"])
            }
        }
    }

    /// `count` more bytes of the body are readable by followers: a batch's
    /// write completed, or it went to the memory window. Throws the fill's
    /// failure when the body is longer than the upstream said. Called by
    /// `BlobSink` in the body's order: one write is in flight at a time.
    func written(_ count: Int64) throws {
        if case .discard(let failure) = transition({ $0.bytesWritten(count) }) { throw failure }
    }

    // MARK: without the disk

    static let noFollowers = "the disk failed and no client is left to stream to"

    /// The disk failed (or had no room for a new file): what is in the file
    /// stays readable below `fileEnd`; the rest streams from memory.
    func storageFailed(_ error: any Error, fileEnd: Int64) {
        inner.withLockedValue { inner in
            if inner.storageError == nil { inner.storageError = error }
            inner.fileEnd = min(inner.fileEnd, fileEnd)
            inner.machine.storageLost()
        }
    }

    /// Counts and logs the storage error this fill met, if any, once.
    private func countStorageError(_ context: FillContext) {
        guard let error = inner.withLockedValue({ inner -> (any Error)? in
            defer { inner.storageError = nil }
            return inner.storageError
        }) else { return }
        let code = (error as? StoreError)?.code ?? 0
        let reason: String
        switch code {
        case ENOSPC: reason = "enospc"
        case EDQUOT: reason = "edquot"
        case EIO: reason = "eio"
        case EROFS: reason = "erofs"
        default: reason = "other"
        }
        context.metrics.fillErrors[reason]?.increment()
        context.logger.warning("storage failed during a fill; the blob was not kept",
                               metadata: ["digest": "\(digest)", "error": "\(error)"])
    }

    /// Keeps a batch that did not reach the disk in the memory window, for
    /// followers to read, and makes it readable (`written`) once there is
    /// room. Waits while the window is full: the upstream is
    /// then read only as fast as the slowest follower takes bytes, so memory
    /// stays bounded whatever the blob's size. The wait is the followers',
    /// not the upstream's: `clock` is paused meanwhile. A slow follower is
    /// bounded by the send timeout, which cuts it and makes room.
    func spill(_ batch: ByteBuffer, at offset: Int64, clock: IdleClock) async throws {
        inner.withLockedValue { $0.window.append(batch, at: offset) }
        try await clock.paused {
            while true {
                try Task.checkCancellation()
                let full: Bool = try inner.withLockedValue { inner in
                    if inner.everFollowed && inner.needs.isEmpty {
                        throw FillStateMachine.Failure.storage(Self.noFollowers)
                    }
                    // Before the first follower registers, everything is needed.
                    if inner.everFollowed { inner.window.trim(keeping: Array(inner.needs.values)) }
                    return inner.window.bytes > MemoryWindow.capacity
                }
                guard full else { return }
                await withTaskCancellationHandler {
                    await withCheckedContinuation { continuation in
                        let ready = inner.withLockedValue { inner -> Bool in
                            // Before the first follower, wait for it (its
                            // registration wakes this wait); after the
                            // last one, go on to the check that stops.
                            if Task.isCancelled || (inner.everFollowed && inner.needs.isEmpty)
                                || (inner.everFollowed && inner.window.canTrim(keeping: Array(inner.needs.values))) {
                                return true
                            }
                            inner.roomWaiter = continuation
                            return false
                        }
                        if ready { continuation.resume() }
                    }
                } onCancel: {
                    inner.withLockedValue { $0.takeRoomWaiter() }?.resume()
                }
            }
        }
        try written(Int64(batch.readableBytes))
    }
}
