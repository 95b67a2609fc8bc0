import NIOCore
import NIOHTTP1

/// One blob `GET` on a connection of its own (`FillDownload`): the answer's
/// head, then its body handed to the fill's task a read burst at a time,
/// as fast as the task takes it.
///
/// A pure state machine: `FillDownloadHandler` feeds it the channel's
/// events and the body consumer's demand, and does what the returned action
/// says (AsyncHTTPClient's pattern). Every way a download ends (the body's
/// end, a cut, a reset, garbage, a consumer that left) is one transition
/// here.
struct FillDownloadStateMachine {
    enum State {
        /// The request is written; no answer head yet.
        case awaitingHead
        /// The head is handed on; body parts of the read in progress are
        /// gathered in `parts` until its `channelReadComplete`, and handed
        /// on together. `wantsMore`: the consumer has room for more.
        case streaming(parts: [ByteBuffer], wantsMore: Bool)
        /// The body ended, failed, or its consumer left.
        case done
    }

    /// (No answer in time is `FillDownload.get`'s to tell: its deadline
    /// runs from before the connection is made.)
    enum Failure: Error, Equatable, CustomStringConvertible {
        /// The connection closed (or was reset) before the answer's end.
        case cut
        /// An answer this could not read as HTTP.
        case malformed

        var description: String {
            switch self {
            case .cut: "the upstream closed the connection before its answer's end"
            case .malformed: "the upstream's answer was not HTTP"
            }
        }
    }

    enum Action {
        case none
        /// Ask the channel for the next read.
        case read
        /// Hand the head on (and make the body's stream), then read.
        case answer(HTTPResponseHead)
        /// Hand these parts to the body's consumer; `end`: and end it.
        case yield([ByteBuffer], end: Bool)
        /// Fail the head's wait, or the body (parts first), and close.
        case fail(Failure, parts: [ByteBuffer], headAnswered: Bool)
        /// Close the connection: the download is over.
        case close
    }

    private(set) var state: State = .awaitingHead

    mutating func receivedHead(_ head: HTTPResponseHead) -> Action {
        // (NIO's decoder drops interim 1xx answers, except a 101, which
        // comes here as the answer and `UpstreamClient.getBlob` refuses.)
        guard case .awaitingHead = state else { return fail(.malformed) }
        state = .streaming(parts: [], wantsMore: true)
        return .answer(head)
    }

    mutating func receivedBody(_ part: ByteBuffer) -> Action {
        guard case .streaming(var parts, let wantsMore) = state else { return fail(.malformed) }
        state = .done  // no copy-on-write of `parts` while it is appended to
        parts.append(part)
        state = .streaming(parts: parts, wantsMore: wantsMore)
        return .none
    }

    /// A read burst ended: what it brought goes on together, and the next
    /// read is asked for while the consumer has room.
    mutating func readComplete() -> Action {
        switch state {
        case .awaitingHead:
            return .read
        case .streaming(let parts, let wantsMore):
            guard !parts.isEmpty else { return wantsMore ? .read : .none }
            state = .streaming(parts: [], wantsMore: wantsMore)
            return .yield(parts, end: false)
        case .done:
            return .none
        }
    }

    /// No read brought anything for `BlobSink.flushAfter` since the last
    /// hand-on (the timer's once per quiet spell): an empty part tells the
    /// fill the upstream paused, so that what it holds of an unfilled batch
    /// goes to its clients now, not when the next bytes come.
    mutating func quiet() -> Action {
        // Only while reads go on: stopped, the wait is the consumer's.
        guard case .streaming(_, wantsMore: true) = state else { return .none }
        return .yield([ByteBuffer()], end: false)
    }

    /// What the consumer said to a hand-on: `more` false when its buffer
    /// is full (reads stop until it asks).
    mutating func yielded(more: Bool) -> Action {
        guard case .streaming(let parts, _) = state else { return .none }
        state = .streaming(parts: parts, wantsMore: more)
        return more ? .read : .none
    }

    /// The consumer took enough to want more.
    mutating func demanded() -> Action {
        guard case .streaming(let parts, let wantsMore) = state, !wantsMore else { return .none }
        state = .streaming(parts: parts, wantsMore: true)
        return .read
    }

    mutating func receivedEnd() -> Action {
        guard case .streaming(let parts, _) = state else { return fail(.malformed) }
        state = .done
        return .yield(parts, end: true)
    }

    /// The connection closed or reset; `transport` false for the decoder's
    /// error (an answer that is not HTTP).
    mutating func failed(transport: Bool) -> Action { fail(transport ? .cut : .malformed) }

    /// The consumer is gone (it finished, failed or was cancelled).
    mutating func consumerLeft() -> Action {
        state = .done
        return .close
    }

    private mutating func fail(_ failure: Failure) -> Action {
        let previous = state
        state = .done
        switch previous {
        case .awaitingHead: return .fail(failure, parts: [], headAnswered: false)
        case .streaming(let parts, _): return .fail(failure, parts: parts, headAnswered: true)
        case .done: return .close
        }
    }
}
