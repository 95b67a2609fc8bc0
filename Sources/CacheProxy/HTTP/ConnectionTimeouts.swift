import NIOCore
import NIOHTTP1

/// Which of a client connection's waits is being timed, without any IO, so
/// that each rule can be tested on its own. The handler below drives one
/// timer from it.
///
/// Each timeout bounds one wait and nothing else (DESIGN.md, Timeouts):
/// - `head`: from the first byte of a request head to its end;
/// - `idle`: a keep-alive connection with no request and no response;
/// - `requestBody`: between two reads of a request body, counted only while
///   the proxy asks for more bytes, so an upstream that pushes back on an
///   upload is not held against the client.
/// None of them runs while a response is being written: that is the send
/// timeout's business (`SendWatch`), and it measures progress, not
/// duration, so a large blob to a slow client is never cut while it moves.
struct ConnectionTimeoutsStateMachine {
    enum Kind: String, Sendable {
        case head
        case idle
        case requestBody = "request_body"
    }

    struct Limits: Sendable {
        var head: TimeAmount
        var idle: TimeAmount
        var requestBody: TimeAmount
    }

    enum Request: Equatable {
        /// Between requests, no byte of the next head yet.
        case awaitingHead
        /// Some bytes of a head arrived; the decoder has not finished it.
        case headStarted
        /// The head is in; body parts (if any) until the request's end.
        case readingBody
    }

    let limits: Limits
    private(set) var request = Request.awaitingHead
    /// Responses whose head was written but whose last byte was not yet.
    private(set) var responding = 0
    /// Requests fully received minus responses fully written. Goes below
    /// zero while a response finished early, before its request's body did.
    private var unanswered = 0
    private(set) var deadline: (kind: Kind, at: NIODeadline)?

    init(limits: Limits, now: NIODeadline) {
        self.limits = limits
        self.deadline = (.idle, now + limits.idle)
    }

    /// Whether raw bytes arriving now belong to a request head (what the
    /// head-size limit counts). After an early response the rest of the
    /// request body is still a body.
    var awaitingHead: Bool { request == .awaitingHead || request == .headStarted }

    mutating func headBytesArrived(now: NIODeadline) {
        guard request == .awaitingHead else { return }
        request = .headStarted
        // A head that starts while an answer is still being written (a
        // pipelining client) is timed from the answer's end instead.
        deadline = responding == 0 ? (.head, now + limits.head) : nil
    }

    mutating func headReceived() {
        request = .readingBody
        deadline = nil
    }

    /// A read was asked of the socket: while a body is expected, the client
    /// has until the limit to deliver the next bytes.
    mutating func readRequested(now: NIODeadline) {
        guard request == .readingBody, deadline == nil else { return }
        deadline = (.requestBody, now + limits.requestBody)
    }

    mutating func bodyReceived() {
        if request == .readingBody { deadline = nil }
    }

    mutating func requestEnded(now: NIODeadline) {
        request = .awaitingHead
        unanswered += 1
        deadline = nil
        armIdleIfQuiet(now: now)
    }

    /// A request `HitFrontHandler` took whole (`requestEnded`) goes to the
    /// decoder after all, which delivers it again: it is not owed twice.
    mutating func requestGivenBack(now: NIODeadline) {
        unanswered -= 1
        armIdleIfQuiet(now: now)
    }

    mutating func responseStarted() {
        responding += 1
        if deadline?.kind == .idle || deadline?.kind == .head { deadline = nil }
    }

    mutating func responseFinished(now: NIODeadline) {
        responding = max(0, responding - 1)
        unanswered -= 1
        if request == .headStarted, responding == 0 {
            deadline = (.head, now + limits.head)
        } else {
            armIdleIfQuiet(now: now)
        }
    }

    /// Whether the proxy may answer a request the decoder could not parse
    /// with its own 400: only while a head was awaited or arriving and no
    /// other answer is owed. A parse error in the middle of a body belongs
    /// to whoever is answering that request; after a pipelined answer still
    /// owed, a 400 would come out of order. Either way the connection just
    /// closes.
    var mayAnswerParseError: Bool {
        request != .readingBody && responding == 0 && unanswered <= 0
    }

    /// No request is arriving or owed an answer: the next byte starts a
    /// new request, and an answer written now cannot overtake another.
    var isQuiet: Bool { request == .awaitingHead && responding == 0 && unanswered <= 0 }

    private mutating func armIdleIfQuiet(now: NIODeadline) {
        if request == .awaitingHead, responding == 0, unanswered <= 0 {
            deadline = (.idle, now + limits.idle)
        }
    }
}

/// Drives `ConnectionTimeoutsStateMachine` and the `SendWatch` for one
/// connection: sits right after the request decoder (before the pipelining
/// handler, so it sees pipelined requests as they arrive) and keeps at most
/// one timer for the first and one for the second. Every client-side
/// timeout lives here: one handler, not several, because each handler in
/// the pipeline costs a hop on every event of every request.
///
/// It also answers what the decoder cannot parse (NIO's
/// `HTTPServerProtocolErrorHandler` would too, but it cannot know that the
/// async side is about to answer the request whose body broke, and a second
/// answer trips the pipelining handler): a 400 only when no other answer is
/// owed, a plain close otherwise.
///
/// The timer is not cancelled and re-armed on every event (a timer-heap
/// insert and removal each, measurable on the hit path): when it fires
/// before the current deadline it re-arms for the time left.
final class ConnectionTimeoutsHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private var machine: ConnectionTimeoutsStateMachine
    private var timer: Scheduled<Void>?
    /// When `timer` fires.
    private var timerAt = NIODeadline.distantFuture
    private var context: ChannelHandlerContext?
    private var send: SendWatch
    private var sendTimer: Scheduled<Void>?
    /// `kind` is a timeout's name as metrics label it: head, idle,
    /// request_body, send.
    private let onTimeout: @Sendable (_ kind: String) -> Void

    init(limits: ConnectionTimeoutsStateMachine.Limits, send: TimeAmount,
         onTimeout: @escaping @Sendable (_ kind: String) -> Void) {
        self.machine = ConnectionTimeoutsStateMachine(limits: limits, now: .now())
        self.send = SendWatch(limit: send)
        self.onTimeout = onTimeout
    }

    var awaitingHead: Bool { machine.awaitingHead }
    var headStarted: Bool { machine.request == .headStarted }

    /// Called by `RequestHeadLimiter`, which sees the raw bytes.
    func headBytesArrived() {
        guard machine.request == .awaitingHead else { return }
        machine.headBytesArrived(now: .now())
        arm()
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        arm()
    }

    /// See `ConnectionTimeoutsStateMachine.isQuiet`; never once the
    /// connection is closing (a request that was not keep-alive, a parse
    /// error), even in the moment before it is closed.
    var isQuiet: Bool { machine.isQuiet && !closing }
    private var closing = false

    /// A request `HitFrontHandler` took whole from the bytes, timed as one
    /// that came through the decoder: owed an answer from now on, so no
    /// head or idle timer runs while it is answered (a pull by tag waits for
    /// the upstream, whose own answer timeout bounds that) and nothing else
    /// is answered ahead of it.
    func takenAhead() {
        machine.requestEnded(now: .now())
    }

    /// The request `takenAhead` goes to the decoder after all.
    func givenBack() {
        machine.requestGivenBack(now: .now())
        arm()
    }

    /// The answer to a request `takenAhead` is written and flushed, `bytes`
    /// of it: watched by the send timeout until the write completes. Three
    /// calls, in this order, where a future would be watched by a callback
    /// of its own: the caller's one completion on the write calls
    /// `answeredAhead` (a second callback cost a closure and the callback
    /// list's storage per hit), and `flushedAhead` comes after it is
    /// attached, so a write the socket took at once (its completion ran on
    /// attaching) needs no look at the socket's queue.
    func answeringAhead(bytes: Int) {
        machine.responseStarted()
        send.handedDown(bytes)
    }

    /// The write `answeringAhead` announced completed (or failed): the idle
    /// timer starts. On the channel's event loop.
    func answeredAhead() {
        machine.responseFinished(now: .now())
        arm()
    }

    /// After the completion is attached: starts the send watch if the
    /// write is still out.
    func flushedAhead(channel: any Channel) {
        if let context, send.flushed(queued: { Self.queuedBytes(channel) }, unfinished: machine.responding > 0,
                                     writable: channel.isWritable) {
            scheduleSendCheck(context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        cancelTimers()
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancelTimers()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        closing = true
        if error is HTTPParserError, machine.mayAnswerParseError {
            let oci = OCIError(.badRequest, .unsupported, "the request could not be parsed as HTTP/1.1")
            let headers: HTTPHeaders = ["content-type": "application/json", "content-length": String(oci.body.utf8.count),
                                        "connection": "close"]
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .badRequest, headers: headers))),
                          promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: oci.body)))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
        // The decoder closes the connection after a parse error.
        context.fireErrorCaught(error)
    }

    private func cancelTimers() {
        timer?.cancel()
        timer = nil
        sendTimer?.cancel()
        sendTimer = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            machine.headReceived()
            if !head.isKeepAlive { closing = true }
        case .body: machine.bodyReceived()
        case .end:
            machine.requestEnded(now: .now())
            arm()
        }
        context.fireChannelRead(data)
    }

    func read(context: ChannelHandlerContext) {
        // Only a request body in progress is timed per read: skip the clock
        // otherwise (this runs after every read on every connection).
        if machine.request == .readingBody {
            machine.readRequested(now: .now())
            arm()
        }
        context.read()
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .head(let head):
            // A 100 Continue is not the answer: no end follows it.
            if head.status.code >= 200 { machine.responseStarted() }
            context.write(data, promise: promise)
        case .body(let bytes):
            send.handedDown(bytes.readableBytes)
            context.write(data, promise: promise)
        case .end:
            // A response is over when its last byte is written, not when its
            // end is queued: until then the send timeout watches it.
            let written = promise ?? context.eventLoop.makePromise()
            let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
            written.futureResult.whenComplete { _ in
                let handler = loopBound.value
                handler.machine.responseFinished(now: .now())
                handler.arm()
            }
            context.write(data, promise: written)
        }
    }

    func flush(context: ChannelHandlerContext) {
        context.flush()
        let channel = context.channel
        // A response written whole within this flush has finished by now
        // (its end's write completed): no look at the queue for it.
        if send.flushed(queued: { Self.queuedBytes(channel) }, unfinished: machine.responding > 0,
                        writable: channel.isWritable) {
            scheduleSendCheck(context)
        }
    }

    private func scheduleSendCheck(_ context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        sendTimer = context.eventLoop.scheduleTask(in: send.tick) {
            let (handler, context) = loopBound.value
            handler.sendTimer = nil
            guard context.channel.isActive else { return }
            switch handler.send.check(queued: Self.queuedBytes(context.channel)) {
            case .done: break  // all written: the next flush looks again
            case .keepWatching: handler.scheduleSendCheck(context)
            case .stalled:
                handler.onTimeout("send")
                context.close(promise: nil)
            }
        }
    }

    /// Bytes NIO holds unwritten (reading the option is a chain of dynamic
    /// casts inside NIO: done only when `SendWatch` asks).
    private static func queuedBytes(_ channel: any Channel) -> Int {
        (try? channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
    }

    /// Makes sure a timer fires no later than the current deadline. The
    /// timer is never set further out than the shortest limit, so a new
    /// deadline (now + some limit) is never earlier than it: a timer is
    /// replaced only in the rare case the clock says otherwise, and the hit
    /// path arms no timer per request.
    private func arm() {
        guard let context, let deadline = machine.deadline else { return }
        if let timer {
            guard deadline.at < timerAt else { return }
            timer.cancel()
        }
        schedule(context, at: min(deadline.at, .now() + shortest))
    }

    private var shortest: TimeAmount {
        min(machine.limits.head, machine.limits.idle, machine.limits.requestBody)
    }

    private func schedule(_ context: ChannelHandlerContext, at when: NIODeadline) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timerAt = when
        timer = context.eventLoop.scheduleTask(deadline: when) {
            let (handler, context) = loopBound.value
            handler.timer = nil
            handler.timerAt = .distantFuture
            guard let deadline = handler.machine.deadline else { return }  // armed again by the next event
            if deadline.at <= .now() {
                handler.onTimeout(deadline.kind.rawValue)
                context.close(promise: nil)
            } else {
                handler.schedule(context, at: min(deadline.at, .now() + handler.shortest))
            }
        }
    }
}
