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
/// It only answers at a request boundary with nothing owed: the timeouts
/// handler knows when no request is arriving, no answer is pending and the
/// connection is not closing (`isQuiet`), and the bytes it last passed to
/// the decoder ended a head (so the decoder holds none). So its answers can
/// never overtake a pipelined answer, nor split a request the decoder is in
/// the middle of, nor follow a `Connection: close`. Whatever it declines (any other request, a head cut
/// across reads, a client that stopped reading) goes on to the decoder with
/// everything after it in the same read.
final class HitFrontHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let hits: CacheHitResponder
    private let timeouts: ConnectionTimeoutsHandler
    /// The longest head parsed here (`max_header_bytes`).
    private let limit: Int
    /// Shared with `RequestFrontHandler`: one memo per connection.
    private let credentials: AccessGate.CredentialMemo
    /// The client's address for the request log, formatted once.
    private var client: String?
    /// The last four bytes handed to the decoder, newest lowest. A head ends
    /// at its first CRLF CRLF, so while they are CRLF CRLF the decoder holds
    /// no unfinished head; after anything else (a head cut across reads, a
    /// body) it may, though no request is owed yet, and the fast path waits
    /// until what it passes on ends clean again.
    private var forwardedTail: UInt32 = HitFrontHandler.clean
    private static let clean: UInt32 = 0x0D0A_0D0A

    init(hits: CacheHitResponder, timeouts: ConnectionTimeoutsHandler, limit: Int,
         credentials: AccessGate.CredentialMemo) {
        self.hits = hits
        self.timeouts = timeouts
        self.limit = limit
        self.credentials = credentials
    }

    func handlerAdded(context: ChannelHandlerContext) {
        client = context.channel.remoteAddress?.ipAddress
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        // While the client reads its answers, pipelined hits in one read
        // are answered in turn; once the channel holds more than its high
        // watermark, the rest goes to the decoder, whose answers wait for
        // the channel to drain (`CacheHitResponder.answer` declines an
        // unwritable channel, and the async side awaits its writes).
        while buffer.readableBytes > 0, forwardedTail == Self.clean, timeouts.isQuiet, context.channel.isWritable,
              let (head, length) = buffer.withUnsafeReadableBytes({ PlainGetHead.parse($0, limit: limit) }),
              hits.answerAhead(head, router: hits.live.router, context: context, client: client,
                               credentials: credentials, timeouts: timeouts) {
            buffer.moveReaderIndex(forwardBy: length)
        }
        guard buffer.readableBytes > 0 else { return }
        buffer.withUnsafeReadableBytes { bytes in
            for byte in bytes.suffix(4) { forwardedTail = forwardedTail << 8 | UInt32(byte) }
        }
        context.fireChannelRead(wrapInboundOut(buffer))
    }
}
