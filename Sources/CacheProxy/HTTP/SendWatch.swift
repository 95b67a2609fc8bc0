import NIOCore

/// The send timeout: cuts a connection whose response has stopped moving,
/// because the client asked for bytes and does not read them (nginx's
/// `send_timeout`). Without it a client that never reads holds a socket, a
/// file descriptor and the bytes queued for it forever.
///
/// It measures progress, not duration: a 1 GB layer to a client on a slow
/// link takes minutes and must never be cut while it moves. Progress is
/// bytes leaving for the socket: the body bytes handed down so far less what
/// NIO still holds unwritten (it counts file regions, and a partial
/// `sendfile` shrinks it). The queue alone would not do: a follower hands
/// down one 4 MiB region after another, so the queue jumps back up at each
/// region and a steady reader could look stalled.
///
/// The queue is looked at after a flush only when a socket buffer's worth
/// was handed down since the last look or the channel stopped being
/// writable; only when bytes stay queued does a timer run, ticking every
/// quarter of the limit until the queue is empty again. A small hit costs
/// neither a look nor a timer. Owned by `ConnectionTimeoutsHandler`, which
/// sees every write and flush of the connection, on its event loop.
struct SendWatch {
    let limit: TimeAmount
    /// Body bytes handed down so far, and at the last look at the queue.
    private var handed: Int64 = 0
    private var handedAtLook: Int64 = 0
    /// Bytes known written at the last look, and when that last grew.
    private var written: Int64 = 0
    private var lastProgress = NIODeadline.now()
    private(set) var watching = false

    static let lookEvery: Int64 = 64 * 1024

    init(limit: TimeAmount) {
        self.limit = limit
    }

    var tick: TimeAmount { .nanoseconds(max(limit.nanoseconds / 4, 10_000_000)) }

    mutating func handedDown(_ bytes: Int) {
        handed += Int64(bytes)
    }

    /// After a flush: whether to start watching (bytes stayed queued).
    mutating func flushed(queued: () -> Int, writable: Bool) -> Bool {
        guard !watching, handed - handedAtLook >= Self.lookEvery || !writable else { return false }
        handedAtLook = handed
        let pending = queued()
        guard pending > 0 else { return false }
        written = handed - Int64(pending)
        lastProgress = .now()
        watching = true
        return true
    }

    enum Verdict { case done, keepWatching, stalled }

    /// At a tick: all written (stop), moving (tick again) or stalled.
    mutating func check(queued pending: Int) -> Verdict {
        guard pending > 0 else {
            watching = false
            return .done
        }
        let now = NIODeadline.now()
        let writtenNow = handed - Int64(pending)
        if writtenNow > written {
            written = writtenNow
            lastProgress = now
        } else if now - lastProgress >= limit {
            watching = false
            return .stalled
        }
        return .keepWatching
    }
}
