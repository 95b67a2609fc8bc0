import NIOCore
import NIOHTTP1

/// The size cap on a request head that NIO's decoder does not enforce the
/// way a proxy facing the network needs: 431 above it, counted on the raw
/// bytes before the decoder buffers them. It also tells the connection's
/// timeouts when the first byte of a head arrives, which only the raw bytes
/// show. Whether bytes belong to a head at all is the timeouts handler's
/// knowledge (it sees where each request ends), so a request body that is
/// still arriving after an early response is never counted as a head.
final class RequestHeadLimiter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let timeouts: ConnectionTimeoutsHandler
    private let limit: Int
    private var headBytes = 0
    private var rejected = false
    /// How much of the `\r\n\r\n` that ends a head the last bytes matched,
    /// so a terminator split across two reads is still found.
    private var matched = 0

    init(timeouts: ConnectionTimeoutsHandler, limit: Int) {
        self.timeouts = timeouts
        self.limit = limit
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !rejected else { return }
        if timeouts.awaitingHead {
            if !timeouts.headStarted {
                headBytes = 0
                matched = 0
                timeouts.headBytesArrived()
            }
            // Count only up to the end of the head, before the decoder sees
            // anything: body bytes in the same read are not held against the
            // limit, and an oversized head never reaches the decoder.
            let buffer = unwrapInboundIn(data)
            let headPart = buffer.withUnsafeReadableBytes { bytes -> Int in
                for (index, byte) in bytes.enumerated() {
                    switch (matched, byte) {
                    case (0, 13), (2, 13): matched += 1
                    case (1, 10): matched = 2
                    case (3, 10): matched = 0; return index + 1
                    case (_, 13): matched = 1
                    default: matched = 0
                    }
                }
                return bytes.count
            }
            headBytes += headPart
            if headBytes > limit {
                reject(context)
                return
            }
        }
        context.fireChannelRead(data)
    }

    private func reject(_ context: ChannelHandlerContext) {
        rejected = true
        let error = OCIError(.init(statusCode: 431, reasonPhrase: "Request Header Fields Too Large"),
                             .tooLarge, "request head is larger than \(limit) bytes")
        var out = context.channel.allocator.buffer(capacity: 256)
        out.writeString("HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n")
        out.writeString("content-length: \(error.body.utf8.count)\r\nconnection: close\r\n\r\n\(error.body)")
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(out)).whenComplete { _ in channel.close(promise: nil) }
    }
}
