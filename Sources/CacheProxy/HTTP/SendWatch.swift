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
/// The queue is looked at after a flush only while a response is not
/// completely written (its end's write has not completed) or the channel
/// stopped being writable; only when bytes stay queued does a timer run,
/// ticking every quarter of the limit until the queue is empty again. A
/// small hit, written whole within its flush, costs neither a look nor a
/// timer. Owned by `ConnectionTimeoutsHandler`, which sees every write and
/// flush of the connection, on its event loop.
struct SendWatch {
    let limit: TimeAmount
    /// Body bytes handed down so far.
    private var handed: Int64 = 0
    /// Bytes known written at the last look, and when that last grew.
    private var written: Int64 = 0
    private var lastProgress = NIODeadline.now()
    private(set) var watching = false

    init(limit: TimeAmount) {
        self.limit = limit
    }

    var tick: TimeAmount { .nanoseconds(max(limit.nanoseconds / 4, 10_000_000)) }

    mutating func handedDown(_ bytes: Int) {
        handed += Int64(bytes)
    }

    /// After a flush: whether to start watching (bytes stayed queued).
    /// `unfinished`: some response's last byte is not written yet.
    mutating func flushed(queued: () -> Int, unfinished: Bool, writable: Bool) -> Bool {
        guard !watching, unfinished || !writable else { return false }
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
