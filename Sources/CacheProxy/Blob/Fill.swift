import AsyncHTTPClient
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
}

/// Everything a fill needs from the rest of the proxy.
struct FillContext: Sendable {
    let client: UpstreamClient
    let store: BlobStore
    let writer: any BlobWriter
    let metrics: ProxyMetrics
    let fsync: Bool
    let logger: Logger
}

/// One upstream download of one digest, however many clients want it.
///
/// The fill writes to a temporary file and hashes as it goes; clients never
/// get bytes from the fill directly, they follow the growing file (see
/// `BlobResponder`). So a slow client never slows the download, and a client
/// that goes away does not stop it.
public final class Fill: Sendable {
    public let digest: Digest
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
        /// Followers registered now; a close that arrives after its follower
        /// left must not leave a mark behind.
        var followers: Set<Int> = []
        var nextFollower = 0

        var snapshot: FillSnapshot {
            FillSnapshot(state: machine.state, mark: machine.followerMark, head: head, answer: answer)
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

    init(digest: Digest, upstream: ProxyConfig.Upstream, repository: String, requestHeaders: HTTPHeaders, holdBack: Int64) {
        self.digest = digest
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
            inner.followers.insert(inner.nextFollower)
            return inner.nextFollower
        }
        let token = watch.onClose { [weak self] in self?.abandon(id) }
        defer {
            watch.cancel(token)
            inner.withLockedValue { inner in
                inner.followers.remove(id)
                inner.abandoned.remove(id)
            }
        }
        return try await body(id)
    }

    func abandon(_ follower: Int) {
        let (woken, snapshot) = inner.withLockedValue { inner -> ([CheckedContinuation<FillSnapshot, Never>], FillSnapshot) in
            guard inner.followers.contains(follower) else { return ([], inner.snapshot) }
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
    /// Pass -1 to wait for the upstream's answer.
    public func next(after mark: Int64, follower: Int) async -> FillSnapshot {
        await withCheckedContinuation { continuation in
            let ready: FillSnapshot? = inner.withLockedValue { inner in
                if inner.isReady(after: mark) || inner.abandoned.contains(follower) { return inner.snapshot }
                inner.waiters.append(Waiter(follower: follower, after: mark, continuation: continuation))
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    enum Reader {
        /// A descriptor of the file being filled, owned by the caller.
        case file(CInt)
        /// The fill is over: the blob is either in the store or gone.
        case over
        /// `dup` failed (EMFILE under fd pressure): retry later.
        case unavailable(Int32)
    }

    /// A descriptor of the file being filled; followers `dup` the fill's own,
    /// so they keep reading after the rename (same inode).
    func openReader() -> Reader {
        inner.withLockedValue { inner -> Reader in
            guard inner.readFD >= 0 else { return .over }
            let fd = dup(inner.readFD)
            return fd >= 0 ? .file(fd) : .unavailable(errno)
        }
    }

    public var state: FillStateMachine.State { inner.withLockedValue { $0.machine.state } }

    public var isFinished: Bool { inner.withLockedValue { $0.machine.isFinished } }

    // MARK: fill side

    @discardableResult
    private func transition(_ body: (inout FillStateMachine) -> FillStateMachine.Action) -> FillStateMachine.Action {
        let (action, woken, snapshot): (FillStateMachine.Action, [CheckedContinuation<FillSnapshot, Never>], FillSnapshot) =
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

    /// Runs the download to its end. Never throws: every failure ends in the
    /// `failed` state with the temporary file deleted.
    func run(_ context: FillContext) async {
        var temporary: (path: String, fd: CInt)?
        defer {
            if let temporary { close(temporary.fd) }
        }
        do {
            transition { $0.start() }
            var headers = requestHeaders
            headers.replaceOrAdd(name: "accept", value: "*/*")
            let url = "\(upstream.origin)/v2/\(repository)/blobs/\(digest)"
            let response: HTTPClientResponse
            do {
                response = try await context.client.getFollowingRedirects(url: url, headers: headers)
            } catch {
                context.metrics.upstreamResponse(upstream: upstream.host, code: 0)
                throw error
            }
            context.metrics.upstreamResponse(upstream: upstream.host, code: Int(response.status.code))
            let length = response.headers.first(name: "content-length").flatMap { Int64(digitsOnly: Substring($0)) }

            guard response.status == .ok else {
                // The status and headers are the answer (a 401's
                // `WWW-Authenticate` starts the client's token dance); a
                // body that stalls or is cut costs only the body.
                let body = (try? await Self.collectBounded(response.body, limit: 64 * 1024,
                                                           idle: context.client.idleTimeout,
                                                           total: context.client.answerTimeout)) ?? ByteBuffer()
                inner.withLockedValue {
                    $0.answer = UpstreamAnswer(status: response.status, headers: response.headers, body: body)
                }
                transition { $0.upstreamResponded(status: Int(response.status.code), contentLength: length) }
                return
            }

            let file = try context.store.makeTemporaryFile(for: digest)
            temporary = file
            let readFD = open(file.path, O_RDONLY | O_CLOEXEC)
            guard readFD >= 0 else { throw StoreError.system("open \(file.path)", errno) }
            inner.withLockedValue {
                $0.readFD = readFD
                $0.head = BlobHead(contentLength: length, contentType: response.headers.first(name: "content-type"))
            }
            transition { $0.upstreamResponded(status: 200, contentLength: length) }

            let (body, fd, writer) = (response.body, file.fd, context.writer)
            let hex = try await UpstreamBody.read(idle: context.client.idleTimeout) { clock in
                var sink = BlobSink(writer: writer, fd: fd, algorithm: self.digest.algorithm)
                do {
                    for try await chunk in body {
                        clock.tick()
                        let written = try await sink.append(chunk)
                        if written > 0, case .discard(let failure) = self.transition({ $0.bytesWritten(written) }) {
                            throw failure
                        }
                    }
                    let finished = try await sink.finish()
                    if case .discard(let failure) = self.transition({ $0.bytesWritten(finished.written) }) { throw failure }
                    return finished.hex
                } catch {
                    await sink.abandon()
                    throw error
                }
            }
            if case .discard(let failure) = transition({ $0.upstreamEnded() }) { throw failure }
            guard case .verifying(let size) = state else { throw FillStateMachine.Failure.upstream("unexpected state") }
            if case .discard(let failure) = transition({ $0.digestChecked(matches: hex == digest.hex) }) { throw failure }
            do {
                if context.fsync { try await context.writer.sync(file.fd) }
                try context.store.publish(temporaryPath: file.path, digest: digest, size: size)
            } catch {
                throw FillStateMachine.Failure.storage(String(describing: error))
            }
            transition { $0.publishSucceeded() }
            context.logger.debug("fill published", metadata: ["digest": "\(digest)", "bytes": "\(size)"])
        } catch {
            let failure = (error as? FillStateMachine.Failure) ?? .upstream(String(describing: error))
            if failure == .digestMismatch { context.metrics.digestMismatches.increment() }
            context.metrics.fillFailures.increment()
            if let temporary { context.store.discard(temporaryPath: temporary.path) }
            // A fill that ended before its first byte is told to the clients
            // as an error of its own: 502/504 for an upstream that could not
            // be reached, 503 for a cache that could not store.
            if state == .requesting {
                let oci = error is StoreError
                    ? OCIError(.serviceUnavailable, .unavailable, "the cache cannot store blobs right now")
                    : UpstreamClient.clientError(for: error)
                inner.withLockedValue {
                    $0.answer = UpstreamAnswer(
                        status: oci.status,
                        headers: ["content-type": "application/json"],
                        body: ByteBuffer(string: oci.body))
                }
            }
            transition { $0.fail(failure) }
            context.logger.warning("fill failed", metadata: ["digest": "\(digest)", "error": "\(failure)"])
        }
    }

    /// Reads a non-200 answer's body: at most `limit` bytes, within the idle
    /// timeout between reads and `total` in all. Stopping early drops the
    /// rest (AsyncHTTPClient then closes that connection): an error body
    /// that is large or trickles must not keep every client of the digest
    /// waiting for its head.
    static func collectBounded(_ body: HTTPClientResponse.Body, limit: Int, idle: Duration,
                               total: Duration) async throws -> ByteBuffer {
        let started = ContinuousClock.now
        return try await UpstreamBody.read(idle: idle) { clock in
            var collected = ByteBuffer()
            for try await var chunk in body {
                clock.tick()
                let room = limit - collected.readableBytes
                if chunk.readableBytes > room { chunk = chunk.getSlice(at: chunk.readerIndex, length: room) ?? ByteBuffer() }
                collected.writeBuffer(&chunk)
                if collected.readableBytes >= limit || ContinuousClock.now - started >= total { break }
            }
            return collected
        }
    }
}
