import NIOCore
import NIOHTTP1

/// Limits on a request head that NIO's decoder does not enforce the way a
/// proxy facing the network needs: a size cap (431 above it) and a total
/// deadline for the head to arrive. The deadline is not an idle timer, so a
/// client trickling one header byte at a time is cut as well.
///
/// Two handlers share one state: `RequestHeadLimiter` sees raw bytes before
/// the decoder, `RequestHeadDeadline` sees decoded parts after it. Both live
/// on the channel's event loop, which is what makes the shared state safe.
final class RequestHeadState {
    var awaitingHead = true
    var headBytes = 0
}

final class RequestHeadLimiter: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let state: RequestHeadState
    private let limit: Int
    private var rejected = false
    /// How much of the `\r\n\r\n` that ends a head the last bytes matched,
    /// so a terminator split across two reads is still found.
    private var matched = 0

    init(state: RequestHeadState, limit: Int) {
        self.state = state
        self.limit = limit
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !rejected else { return }
        if state.awaitingHead {
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
            state.headBytes += headPart
            if state.headBytes > limit {
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

final class RequestHeadDeadline: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let state: RequestHeadState
    private let timeout: TimeAmount
    /// When the head now awaited must have arrived; `nil` while none is.
    private var deadline: NIODeadline?
    /// At most one timer per connection. It is not cancelled and re-armed
    /// per request (a timer-heap insert and removal each, measurable on the
    /// hit path); when it fires early it re-arms for the time left.
    private var timer: Scheduled<Void>?

    init(state: RequestHeadState, timeout: TimeAmount) {
        self.state = state
        self.timeout = timeout
    }

    func handlerAdded(context: ChannelHandlerContext) { awaitHead(context) }
    func handlerRemoved(context: ChannelHandlerContext) { timer?.cancel() }
    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .head = unwrapInboundIn(data) {
            state.awaitingHead = false
            state.headBytes = 0
            deadline = nil
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .end = unwrapOutboundIn(data) {
            state.awaitingHead = true
            state.headBytes = 0
            awaitHead(context)
        }
        context.write(data, promise: promise)
    }

    private func awaitHead(_ context: ChannelHandlerContext) {
        let deadline = NIODeadline.now() + timeout
        self.deadline = deadline
        if timer == nil { schedule(context, at: deadline) }
    }

    private func schedule(_ context: ChannelHandlerContext, at when: NIODeadline) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(deadline: when) {
            let (handler, context) = loopBound.value
            handler.timer = nil
            guard let deadline = handler.deadline else { return }  // a head came; armed again after its response
            if deadline <= .now() {
                context.close(promise: nil)
            } else {
                handler.schedule(context, at: deadline)
            }
        }
    }
}
