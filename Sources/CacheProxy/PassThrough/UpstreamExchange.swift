import NIOCore
import NIOHTTP1
import NIOSSL

/// One bodyless request at a time on a kept-alive upstream connection, and
/// whether the connection may carry the next one.
///
/// A pure state machine: `UpstreamExchangeHandler` feeds it the channel's
/// events and does what the returned action says (AsyncHTTPClient's
/// pattern), so every way an exchange can end (answered, cut, timed out,
/// closed between requests) is one transition that can be read and tested
/// apart from the IO.
struct UpstreamExchangeStateMachine {
    enum State: Equatable {
        /// Connected, nothing asked: the pool may hand it out.
        case idle
        /// A request is written; no byte of the answer yet. A connection the
        /// upstream closed while idle fails here without an answer, which is
        /// what makes a retry on a fresh connection safe.
        case awaitingHead
        /// The head is in; the (empty) body's end is not.
        case awaitingEnd(UpstreamAnswerHead)
        case closed
    }

    enum Action: Equatable {
        case none
        /// Write the request and start the answer deadline.
        case send
        /// The exchange is over: hand the head on; keep the connection for
        /// the next request only when `reusable`.
        case succeed(UpstreamAnswerHead, reusable: Bool)
        /// The exchange failed; `beforeAnswer` when not one byte of an
        /// answer came (a retry cannot be a duplicate the upstream acted on
        /// differently: only idempotent requests are sent here). Close the
        /// connection.
        case fail(Failure, beforeAnswer: Bool)
        /// Nothing was asked: close, and let the pool forget it.
        case close
    }

    enum Failure: Error, Equatable {
        /// The upstream closed or reset the connection before any byte of
        /// an answer: the one failure worth a retry on a new connection.
        case closed
        /// It closed after the answer's head: not retried.
        case cut
        /// Its answer was not HTTP this could read (`UpstreamAnswerHead`):
        /// not retried.
        case malformed
        /// No whole answer head within the answer deadline.
        case timedOut
        /// A request while another is in flight, or on a closed connection.
        case busy
    }

    private(set) var state: State = .idle

    mutating func request() -> Action {
        guard state == .idle else { return .fail(.busy, beforeAnswer: true) }
        state = .awaitingHead
        return .send
    }

    mutating func receivedHead(_ head: UpstreamAnswerHead) -> Action {
        guard case .awaitingHead = state else {
            // An answer nobody asked for: the connection is out of step.
            return close(.closed)
        }
        state = .awaitingEnd(head)
        return .none
    }

    /// The answer ended; `trailing`: bytes came after it that nobody asked
    /// for (the connection is out of step and is not used again).
    mutating func receivedEnd(trailing: Bool = false) -> Action {
        guard case .awaitingEnd(let head) = state else { return close(.closed) }
        // HTTP/1.1 keeps the connection unless it says `close`; 1.0 only
        // when it says `keep-alive` (`isKeepAlive` reads both).
        let reusable = head.isKeepAlive && !trailing
        state = reusable ? .idle : .closed
        return .succeed(head, reusable: reusable)
    }

    /// The connection went away.
    mutating func closed() -> Action { close(.closed) }

    /// Bytes came while no answer was awaited: out of step.
    mutating func receivedOutOfTurn() -> Action { close(.closed) }

    /// An error came up the pipeline: a socket error (a reset) counts as a
    /// close, anything else (the decoder's) as a malformed answer.
    mutating func failed(transport: Bool) -> Action { close(transport ? .closed : .malformed) }

    mutating func timedOut() -> Action { close(.timedOut) }

    private mutating func close(_ failure: Failure) -> Action {
        let previous = state
        state = .closed
        switch previous {
        case .idle: return .close
        case .awaitingHead: return .fail(failure, beforeAnswer: true)
        case .awaitingEnd: return .fail(failure == .closed ? .cut : failure, beforeAnswer: false)
        case .closed: return .none
        }
    }
}

/// Drives `UpstreamExchangeStateMachine` for one upstream connection: the
/// last handler of its pipeline (after TLS, if any), writing each `HEAD` and
/// reading each answer's head as bytes (`UpstreamAnswerHead`). Lives on its
/// channel's event loop, like everything that touches it.
final class UpstreamExchangeHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    typealias Answer = (head: UpstreamAnswerHead, reusable: Bool)

    /// The longest answer head read; a longer one is malformed (NIO's
    /// decoder allowed 80 KiB of headers).
    static let headLimit = 80 * 1024

    typealias Completion = (Result<Answer, any Error>) -> Void

    private let eventLoop: any EventLoop
    private var machine = UpstreamExchangeStateMachine()
    private var context: ChannelHandlerContext?
    private var completion: Completion?
    /// When the answer awaited now is overdue.
    private var answerBy = NIODeadline.distantFuture
    /// The one timer watching `answerBy`, and when it fires. It is not
    /// scheduled and cancelled per exchange (a timer-heap insert and
    /// removal each, on every tag pull): it fires once per answer wait at
    /// most, and then re-arms for the time left when a later answer is
    /// awaited, or stops.
    private var timer: Scheduled<Void>?
    private var timerAt = NIODeadline.distantFuture
    /// The start of an answer head cut across reads, and how much of it
    /// holds no CRLF CRLF: an upstream that drips its head a byte at a time
    /// costs one look at each byte, not a parse of the whole head per read.
    private var partial: ByteBuffer?
    private var partialScanned = 0
    /// Whether the connection has answered before: a failure before the
    /// answer on such a connection is most likely the upstream's keep-alive
    /// timeout, not an upstream that is down.
    private(set) var reused = false

    init(eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    var isIdle: Bool { machine.state == .idle && (context?.channel.isActive ?? false) }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    /// Sends `request`, a whole `HEAD` as bytes (`TagLookup` writes it; the
    /// pool asks nothing else: an answer ends with its head); `completion` gets the
    /// answer's head once it is in, and whether the pool may keep the
    /// connection, or a `UpstreamExchangeStateMachine.Failure`. It may run
    /// before this returns. Must be called on the channel's event loop.
    func ask(_ request: ByteBuffer, within timeout: TimeAmount, completion: @escaping Completion) {
        guard let context, context.channel.isActive else {
            return completion(.failure(UpstreamExchangeStateMachine.Failure.closed))
        }
        switch machine.request() {
        case .send:
            self.completion = completion
            answerBy = eventLoop.now + timeout
            armTimer()
            context.writeAndFlush(wrapOutboundOut(request), promise: nil)
        default:
            completion(.failure(UpstreamExchangeStateMachine.Failure.busy))
        }
    }

    /// Whether CRLF CRLF occurs in `bytes` at or after `from`.
    private static func containsEnd(_ bytes: UnsafeRawBufferPointer, from: Int) -> Bool {
        var index = from
        while index + 3 < bytes.count {
            if bytes[index] == 13, bytes[index + 1] == 10, bytes[index + 2] == 13, bytes[index + 3] == 10 { return true }
            index += 1
        }
        return false
    }

    private func armTimer() {
        guard timer == nil || answerBy < timerAt else { return }
        timer?.cancel()
        timerAt = answerBy
        let loopBound = NIOLoopBound(self, eventLoop: eventLoop)
        timer = eventLoop.scheduleTask(deadline: answerBy) {
            let handler = loopBound.value
            handler.timer = nil
            handler.timerAt = .distantFuture
            guard handler.machine.state == .awaitingHead else { return }  // answered since
            if handler.answerBy <= handler.eventLoop.now {
                handler.act(handler.machine.timedOut())
            } else {
                handler.armTimer()
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        guard machine.state == .awaitingHead else {
            // An answer nobody asked for: the connection is out of step.
            act(machine.receivedOutOfTurn())
            return
        }
        if var earlier = partial {
            partial = nil
            earlier.writeBuffer(&bytes)
            bytes = earlier
            // Parsed only once a head can have ended: a CRLF CRLF among the
            // bytes not looked at yet (from three back, for one cut inside
            // it), or the limit reached.
            let from = max(0, partialScanned - 3)
            let ended = bytes.withUnsafeReadableBytes { raw in
                raw.count >= Self.headLimit || Self.containsEnd(raw, from: from)
            }
            if !ended {
                partialScanned = bytes.readableBytes
                partial = bytes
                return
            }
        }
        while true {
            switch UpstreamAnswerHead.parse(bytes, limit: Self.headLimit) {
            case .incomplete:
                partial = bytes
                partialScanned = bytes.readableBytes
                return
            case .malformed:
                act(machine.failed(transport: false))
                return
            case .head(let head, let length):
                bytes.moveReaderIndex(forwardBy: length)
                // An interim answer (`100 Continue`, `103 Early Hints`): the
                // answer follows it. `101` would switch protocols: not HTTP.
                if head.status.code / 100 == 1 {
                    guard head.status.code != 101 else {
                        act(machine.failed(transport: false))
                        return
                    }
                    continue
                }
                act(machine.receivedHead(head))
                act(machine.receivedEnd(trailing: bytes.readableBytes > 0))
                return
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        act(machine.closed())
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A TLS upstream that closes without `close_notify` (many do, at
        // their keep-alive timeout) is a close like a reset, not a
        // malformed answer: on a reused connection it is asked again.
        act(machine.failed(transport: error is IOError || error as? NIOSSLError == .uncleanShutdown))
    }

    private func act(_ action: UpstreamExchangeStateMachine.Action) {
        switch action {
        case .none, .send:
            break
        case .succeed(let head, let reusable):
            reused = true
            answerBy = .distantFuture
            if !reusable {
                stopTimer()
                context?.close(promise: nil)
            }
            let completion = self.completion
            self.completion = nil
            completion?(.success((head, reusable)))
        case .fail(let failure, _):
            stopTimer()
            context?.close(promise: nil)
            let completion = self.completion
            self.completion = nil
            completion?(.failure(failure))
        case .close:
            stopTimer()
            context?.close(promise: nil)
        }
    }

    private func stopTimer() {
        timer?.cancel()
        timer = nil
        timerAt = .distantFuture
    }
}
