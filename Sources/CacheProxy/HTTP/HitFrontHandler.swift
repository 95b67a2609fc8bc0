import NIOCore

/// The hit fast path: answers a plain `GET` of a small blob, or a manifest
/// by digest, held in memory straight from the connection's bytes, ahead of
/// NIO's HTTP decoder, and hands everything else on untouched.
///
/// On the 4 KiB hit, the decoder, the pipelining handler, the timeouts
/// handler, the request checks and the encoder cost more than half of the
/// proxy's own CPU per request (profile in benchmarks/RESULTS.md); a CI
/// farm pulling the same small blobs thousands of times pays it on every
/// one. Here such a request costs one parse of its head (`PlainGetHead`),
/// the same lookups and access check as any hit, and one `writev` of a
/// response head built once per blob plus the blob's bytes.
///
/// A `GET` of a manifest by tag is taken the same way: its upstream `HEAD`
/// goes out from here (`TagLookup`, on the loop's own kept-alive
/// connection), and a manifest the upstream names that is held in memory is
/// written as bytes too. The profile of a tag pull had the decoder, the
/// pipelining handler, the timeouts handler and the encoder at about a
/// sixth of the proxy's CPU (benchmarks/RESULTS.md). When the loop cannot
/// answer (any other status, a manifest not in memory, no answer), the
/// request's own bytes go to the decoder after all, with the upstream's
/// answer beside them (`TagAskedAhead`), so the async side answers it
/// without asking twice.
///
/// It only answers at a request boundary with nothing owed: the timeouts
/// handler knows when no request is arriving, no answer is pending and the
/// connection is not closing (`isQuiet`), and the bytes it last passed to
/// the decoder ended a head (so the decoder holds none). So its answers can
/// never overtake a pipelined answer, nor split a request the decoder is in
/// the middle of, nor follow a `Connection: close`. Whatever it declines (any other request, a head cut
/// across reads, a client that stopped reading) goes on to the decoder with
/// everything after it in the same read. Bytes that come while a tag's
/// upstream is asked wait for its answer, and past `limit` of them the
/// connection stops reading until then.
final class HitFrontHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = IOData

    private let hits: CacheHitResponder
    private let timeouts: ConnectionTimeoutsHandler
    /// The longest head parsed here (`max_header_bytes`).
    private let limit: Int
    /// Shared with `RequestFrontHandler`: one memo per connection.
    private let credentials: AccessGate.CredentialMemo
    /// Where an upstream answer this could not write waits for
    /// `RequestFrontHandler`.
    private let askedAhead: TagAskedAhead
    /// The client's address for the request log, formatted once.
    private var client: String?
    /// The last four bytes handed to the decoder, newest lowest. A head ends
    /// at its first CRLF CRLF, so while they are CRLF CRLF the decoder holds
    /// no unfinished head; after anything else (a head cut across reads, a
    /// body) it may, though no request is owed yet, and the fast path waits
    /// until what it passes on ends clean again.
    private var forwardedTail: UInt32 = HitFrontHandler.clean
    private static let clean: UInt32 = 0x0D0A_0D0A

    /// A pull by tag taken here whose upstream is being asked: the
    /// request's own bytes (for the decoder, should the answer not be
    /// written here) and what the client sent after them meanwhile.
    private struct Pending {
        var request: ByteBuffer
        var after: ByteBuffer?
    }
    private var pending: Pending?
    /// A read the pipeline asked for while more than `limit` bytes wait.
    private var readHeld = false
    /// Whether bytes went on to the decoder since the last read completed.
    /// When none did (every request in the read answered here), the rest
    /// of the pipeline has nothing to complete, and the event stops here:
    /// six handlers' hops per hit, ~3% of its CPU.
    private var forwardedSinceComplete = false

    init(hits: CacheHitResponder, timeouts: ConnectionTimeoutsHandler, limit: Int,
         credentials: AccessGate.CredentialMemo, askedAhead: TagAskedAhead) {
        self.hits = hits
        self.timeouts = timeouts
        self.limit = limit
        self.credentials = credentials
        self.askedAhead = askedAhead
    }

    func handlerAdded(context: ChannelHandlerContext) {
        client = context.channel.remoteAddress?.ipAddress
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        if pending != nil {
            hold(buffer)
            return
        }
        process(buffer, context: context)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard forwardedSinceComplete else { return }
        forwardedSinceComplete = false
        context.fireChannelReadComplete()
    }

    func channelInactive(context: ChannelHandlerContext) {
        // A lookup still out finds its client gone (`resolve`); nothing waits.
        pending = nil
        context.fireChannelInactive()
    }

    func read(context: ChannelHandlerContext) {
        if let pending, (pending.after?.readableBytes ?? 0) > limit {
            readHeld = true
            return
        }
        context.read()
    }

    private func process(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        var buffer = bytes
        // While the client reads its answers, pipelined hits in one read
        // are answered in turn; once the channel holds more than its high
        // watermark, the rest goes to the decoder, whose answers wait for
        // the channel to drain (`CacheHitResponder.answer` declines an
        // unwritable channel, and the async side awaits its writes).
        while buffer.readableBytes > 0, forwardedTail == Self.clean, timeouts.isQuiet, context.channel.isWritable,
              let (head, length) = buffer.withUnsafeReadableBytes({ PlainGetHead.parse($0, limit: limit) }) {
            if hits.answerAhead(head, router: hits.live.router, context: context, client: client,
                                credentials: credentials, timeouts: timeouts) {
                buffer.moveReaderIndex(forwardBy: length)
                continue
            }
            guard let request = buffer.getSlice(at: buffer.readerIndex, length: length) else { break }
            var after = buffer
            after.moveReaderIndex(forwardBy: length)
            if lookUp(head, bytes: request, after: after, context: context) { return }
            break
        }
        forward(buffer, context: context)
    }

    /// Starts the upstream `HEAD` for a pull by tag taken from the bytes;
    /// `after`: the rest of the read, which waits for the answer. False,
    /// having done nothing, when it is not one the loop asks.
    private func lookUp(_ request: PlainGetHead, bytes: ByteBuffer, after: ByteBuffer,
                        context: ChannelHandlerContext) -> Bool {
        // A digest has a colon and a tag cannot: a blob or manifest by
        // digest that was not answered above is not looked at again.
        guard !request.target.containsByte(UInt8(ascii: ":")),
              let lookup = TagLookup(request, bytes: bytes, router: hits.live.router, tags: hits.tags)
        else { return false }
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        // Set before the lookup starts, the rest of the read included: an
        // answer that came at once would find them.
        pending = Pending(request: bytes, after: after.readableBytes > 0 ? after : nil)
        timeouts.takenAhead()
        // The closures hold the handler (through its loop-bound box), not
        // copies of what it holds: each capture is a retain per pull.
        let started = hits.resolve(lookup, context: context, answer: { reply, started in
            let handler = loopBound.value
            return handler.hits.answerAhead(lookup, request: request, reply: reply, context: context,
                                            client: handler.client, started: started,
                                            credentials: handler.credentials, timeouts: handler.timeouts)
        }) { handed in
            loopBound.value.lookedUp(handed: handed, context: context)
        }
        if !started {
            pending = nil
            timeouts.givenBack()
        }
        return started
    }

    /// The lookup is over: answered here (`handed` nil), or to be answered
    /// by the async side with what the upstream said. One is out at a time,
    /// and a client that left took `pending` with it (`channelInactive`).
    private func lookedUp(handed: TagHandOff.Handed?, context: ChannelHandlerContext) {
        guard let pending, context.channel.isActive else { return }
        self.pending = nil
        if let handed {
            timeouts.givenBack()
            askedAhead.put(handed)
            forward(pending.request, context: context)
            if let after = pending.after { forward(after, context: context) }
            channelReadComplete(context: context)
        } else if let after = pending.after {
            process(after, context: context)
            channelReadComplete(context: context)
        }
        if readHeld {
            // Asked again through the same check: the next lookup may
            // already hold more than `limit` (pipelined pulls), and a read
            // passed straight on would add a read's worth each answer.
            readHeld = false
            read(context: context)
        }
    }

    /// Bytes that came while a lookup is out wait for its answer.
    private func hold(_ buffer: ByteBuffer) {
        if pending?.after == nil {
            pending?.after = buffer
        } else {
            pending?.after?.writeImmutableBuffer(buffer)
        }
    }

    private func forward(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        guard buffer.readableBytes > 0 else { return }
        buffer.withUnsafeReadableBytes { bytes in
            for byte in bytes.suffix(4) { forwardedTail = forwardedTail << 8 | UInt32(byte) }
        }
        forwardedSinceComplete = true
        context.fireChannelRead(wrapInboundOut(buffer))
    }
}
