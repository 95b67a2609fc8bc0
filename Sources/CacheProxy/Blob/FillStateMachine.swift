/// The life of one fill, without any IO, so that every transition can be
/// tested on its own (the way async-http-client models a request).
///
/// ```
/// idle ─► requesting ─► streaming ─► verifying ─► verified ─► published
///              │             │            │  │         └──► delivered
///              │             │            │  └──────────────► delivered
///              └► rejected   └────────────┴─────────────────► failed
/// ```
/// `verified` releases the held-back tail to followers at once: the bytes
/// are known good, so clients need not wait for the fsync and rename that
/// make the cache entry durable.
/// `delivered` is a verified blob the cache does not keep: the disk failed
/// during the fill (the fill went on from memory), the blob is larger than
/// what the size limit keeps (`low_watermark` × `max_size`), or publishing
/// it failed. Its followers get every byte;
/// the next request fills again.
/// `rejected` is an upstream answer other than 200 (401, 404, 429, 5xx): it
/// is handed to the client that asked and nothing is stored.
public struct FillStateMachine: Sendable, Equatable {
    public enum Failure: Error, Equatable, Sendable {
        case upstream(String)
        case tooLong(expected: Int64)
        case truncated(expected: Int64, received: Int64)
        case digestMismatch
        case storage(String)
    }

    public enum State: Equatable, Sendable {
        case idle
        case requesting
        case streaming(written: Int64, expected: Int64?)
        case verifying(size: Int64)
        case verified(size: Int64)
        case published(size: Int64)
        case delivered(size: Int64)
        case rejected(status: Int)
        case failed(Failure)
    }

    /// What the fill must do next. Waking followers is not an action: every
    /// transition wakes those whose wait it ends (`Fill.transition`).
    public enum Action: Equatable, Sendable {
        /// Verified: make it a cache entry.
        case publish(size: Int64)
        /// Verified, not to be kept: followers finish, the file goes.
        case release(size: Int64)
        /// Stop: delete the temporary file; followers see the failure.
        case discard(Failure)
        case none
    }

    public private(set) var state: State = .idle

    /// Bytes held back from followers until the digest is verified, so that a
    /// corrupt upstream ends as a cut connection, never as a complete-looking
    /// wrong body.
    public let holdBack: Int64

    /// False once the disk failed during this fill: the blob is still
    /// verified and served, but not published.
    public private(set) var storing = true

    public init(holdBack: Int64 = 64 * 1024) {
        self.holdBack = holdBack
    }

    public mutating func start() {
        guard state == .idle else { return }
        state = .requesting
    }

    /// The upstream's answer, once the fill has what followers need to act
    /// on it (the answer's body for a rejection, the file for a 200).
    public mutating func upstreamResponded(status: Int, contentLength: Int64?) {
        guard state == .requesting else { return }
        guard status == 200 else {
            state = .rejected(status: status)
            return
        }
        state = .streaming(written: 0, expected: contentLength)
    }

    public mutating func bytesWritten(_ count: Int64) -> Action {
        guard case .streaming(let written, let expected) = state else { return .none }
        let total = written + count
        if let expected, total > expected {
            return fail(.tooLong(expected: expected))
        }
        state = .streaming(written: total, expected: expected)
        return .none
    }

    public mutating func upstreamEnded() -> Action {
        guard case .streaming(let written, let expected) = state else { return .none }
        if let expected, written != expected {
            return fail(.truncated(expected: expected, received: written))
        }
        state = .verifying(size: written)
        return .none
    }

    public mutating func digestChecked(matches: Bool) -> Action {
        guard case .verifying(let size) = state else { return .none }
        guard matches else { return fail(.digestMismatch) }
        guard storing else {
            state = .delivered(size: size)
            return .release(size: size)
        }
        state = .verified(size: size)
        return .publish(size: size)
    }

    /// The disk failed: the bytes go on to followers from memory.
    public mutating func storageLost() {
        storing = false
    }

    public mutating func publishSucceeded() {
        guard case .verified(let size) = state else { return }
        state = .published(size: size)
    }

    /// A verified blob that is not kept (too large for the cache, or the
    /// rename failed): its followers still finish.
    public mutating func notKept() {
        guard case .verified(let size) = state else { return }
        state = .delivered(size: size)
    }

    /// Any error on the way: the upstream broke, the fill was cancelled.
    @discardableResult
    public mutating func fail(_ failure: Failure) -> Action {
        switch state {
        case .published, .delivered, .rejected, .failed:
            return .none
        default:
            state = .failed(failure)
            return .discard(failure)
        }
    }

    public var isFinished: Bool { state.isFinished }

    /// The bytes are known good (verified, published) or there is nothing
    /// more to follow (rejected, failed): no wait for more bytes makes sense.
    public var isSettled: Bool {
        switch state {
        case .verified, .published, .delivered, .rejected, .failed: return true
        default: return false
        }
    }

    /// How far followers may read: -1 before the upstream answered, the bytes
    /// written less the held-back tail while streaming, everything once
    /// published, `Int64.max` for a finished fill that has nothing to follow.
    public var followerMark: Int64 {
        switch state {
        case .idle, .requesting:
            return -1
        case .streaming(let written, let expected):
            if let expected { return max(0, min(written, expected - holdBack)) }
            return max(0, written - holdBack)
        case .verifying(let size):
            return max(0, size - holdBack)
        case .verified(let size), .published(let size), .delivered(let size):
            return size
        case .rejected, .failed:
            return Int64.max
        }
    }
}

extension FillStateMachine.State {
    /// Nothing more will come from the fill: published, delivered, rejected
    /// or failed.
    public var isFinished: Bool {
        switch self {
        case .published, .delivered, .rejected, .failed: return true
        default: return false
        }
    }
}
