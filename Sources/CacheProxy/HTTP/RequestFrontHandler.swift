import NIOCore
import NIOHTTP1

/// The first stop of a decoded request on the event loop: the head checks
/// (`RequestValidator`), then cache hits (`CacheHitResponder`); anything
/// else goes on to the async side.
///
/// One handler for both, not two: every handler in the pipeline costs a hop
/// on each of a request's events, and on the 4 KiB hit path a separate
/// validator handler measured ~5% of the throughput.
///
/// Sits after the pipelining handler, so it only ever sees a request head
/// when no other response is in flight on the connection, and its answers
/// keep their place among pipelined responses.
final class RequestFrontHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let hits: CacheHitResponder
    /// True between a head answered here and that request's end: its body
    /// parts are dropped.
    private var consuming = false
    /// True from a refused head on: the rest of the connection is dropped.
    private var refused = false
    /// Which tag lookup the two flags below belong to. A lookup's answer,
    /// written inside its callback, makes the pipelining handler deliver the
    /// next request (and start its lookup) before that callback returns.
    private var lookup = 0
    /// True while a tag's upstream `HEAD` asked here is out (`TagLookup`).
    private var resolvingTag = false
    /// The end of that request came and was dropped: when the request goes
    /// on to the async side after all, an end goes with it.
    private var resolvingTagEnded = false
    /// Where the upstream's answer goes when the async side answers.
    private let handOff: TagHandOff
    /// An upstream answer `HitFrontHandler` got for the request now
    /// arriving, shared with it.
    private let askedAhead: TagAskedAhead

    /// This connection's last credential and its hash (access checks),
    /// shared with `HitFrontHandler`.
    private let credentials: AccessGate.CredentialMemo
    /// The client's address as the request log writes it: formatted once
    /// per connection, not per request.
    private var client: String?

    init(hits: CacheHitResponder, credentials: AccessGate.CredentialMemo, handOff: TagHandOff,
         askedAhead: TagAskedAhead) {
        self.hits = hits
        self.credentials = credentials
        self.handOff = handOff
        self.askedAhead = askedAhead
    }

    func handlerAdded(context: ChannelHandlerContext) {
        client = context.channel.remoteAddress?.ipAddress
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            // The configuration in force when the head came: one read for
            // the checks and the hit path both.
            let router = hits.live.router
            let askedAhead = self.askedAhead.take()
            switch RequestValidator.check(head, router: router) {
            case .accept(let head) where askedAhead != nil:
                // A pull by tag the fast path already asked the upstream
                // for (`HitFrontHandler`): on to the async side with that
                // answer, never asked twice.
                if let askedAhead { handOff.put(askedAhead) }
                context.fireChannelRead(wrapInboundOut(.head(head)))
            case .accept(var head):
                // Set before the answer is written: a request delivered from
                // the pipelining handler's buffer gets its own end during
                // that write, and the end must be taken as this one's.
                consuming = true
                if hits.answer(head, router: router, context: context, client: client, credentials: credentials,
                               wrap: wrapOutboundOut) {
                    return
                }
                consuming = false
                if let lookup = TagLookup(head, router: router, tags: hits.tags), resolve(lookup, head: head, context: context) {
                    return
                }
                if head.headers.contains(name: "expect") {
                    // `Expect: 100-continue` is answered here, at once, the
                    // way nginx does: the body is streamed on as it comes,
                    // and a client must not sit out its own continue timeout
                    // (curl, Go: 1 s) against the request-body timeout. The
                    // upstream gets the body without the expectation.
                    head.headers.remove(name: "expect")
                    context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .continue))),
                                          promise: nil)
                }
                context.fireChannelRead(wrapInboundOut(.head(head)))
            case .answerOptions:
                consuming = true
                RequestValidator.respond(context, status: .ok, version: head.version,
                                         extra: ["allow": RequestValidator.allowed], error: nil, close: !head.isKeepAlive)
            case .refuse(let error, let extra):
                refused = true
                RequestValidator.respond(context, status: error.status, version: head.version, extra: extra,
                                         error: error, close: true)
            }
        case .body:
            if !consuming { context.fireChannelRead(data) }
        case .end:
            if consuming {
                consuming = false
                if resolvingTag { resolvingTagEnded = true }
            } else {
                context.fireChannelRead(data)
            }
        }
    }

    /// Starts a tag's lookup on this loop. The request's parts are held
    /// (dropped) meanwhile; the pipelining handler before this one holds any
    /// next request until this one's answer has ended. When the answer is
    /// not one the loop writes, the request goes on to the async side as it
    /// came, with the upstream's answer beside it. The flags are set before
    /// the lookup starts, so an answer that came at once would find them.
    private func resolve(_ lookup: TagLookup, head: HTTPRequestHead, context: ChannelHandlerContext) -> Bool {
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        self.lookup &+= 1
        let mine = self.lookup
        (consuming, resolvingTag, resolvingTagEnded) = (true, true, false)
        let (hits, client, credentials) = (hits, client, credentials)
        let started = hits.resolve(lookup, context: context, answer: { reply, started in
            hits.answer(lookup, head: head, reply: reply, context: context, client: client, started: started,
                        credentials: credentials, wrap: loopBound.value.wrapOutboundOut)
        }) { handed in
            let handler = loopBound.value
            // A lookup answered here may find the flags already taken by the
            // next request's lookup; one handed on has written nothing, so
            // nothing was delivered after it and the flags are its own.
            guard handler.lookup == mine else { return }
            handler.resolvingTag = false
            guard let handed else { return }
            handler.handOff.put(handed)
            context.fireChannelRead(handler.wrapInboundOut(.head(head)))
            if handler.resolvingTagEnded {
                context.fireChannelRead(handler.wrapInboundOut(.end(nil)))
            } else {
                // The end is still to come: it passes as usual.
                handler.consuming = false
            }
            context.fireChannelReadComplete()
        }
        if !started { (consuming, resolvingTag) = (false, false) }
        return started
    }
}
