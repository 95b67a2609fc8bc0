import NIOCore

/// Cuts a connection whose response has stopped moving: the client asked for
/// bytes and does not read them (nginx's `send_timeout`). Without it a client
/// that never reads holds a socket, a file descriptor and the bytes queued
/// for it forever.
///
/// It measures progress, not duration: a 1 GB layer to a client on a slow
/// link takes minutes and must never be cut while it moves. Progress is
/// bytes leaving for the socket: everything handed down this pipeline so far
/// less what NIO still holds unwritten (it counts file regions, and a
/// partial `sendfile` shrinks it). The queue alone would not do: a follower
/// hands down one region after another, so the queue jumps back up at each
/// region and a steady reader can look stalled. The queue is looked at after
/// each flush (a cheap read of a counter); only when bytes stay queued does
/// a timer run, ticking every quarter of the limit until the queue is empty
/// again, so a fast client costs no timer at all.
///
/// It sits first in the pipeline, next to the socket, where everything the
/// connection writes passes as bytes or file regions.
final class SendTimeoutHandler: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = IOData
    typealias OutboundOut = IOData

    private let limit: TimeAmount
    private let onTimeout: @Sendable () -> Void
    private var timer: Scheduled<Void>?
    /// Bytes handed down so far, and at the last look at the queue; bytes
    /// known written at that look, and when that last grew.
    private var handed: Int64 = 0
    private var handedAtLook: Int64 = 0
    private var written: Int64 = 0
    private var lastProgress = NIODeadline.now()

    init(limit: TimeAmount, onTimeout: @escaping @Sendable () -> Void) {
        self.limit = limit
        self.onTimeout = onTimeout
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        handed += Int64(unwrapOutboundIn(data).readableBytes)
        context.write(data, promise: promise)
    }

    func flush(context: ChannelHandlerContext) {
        context.flush()
        guard timer == nil else { return }
        // Less than a socket buffer's worth since the last look, on a
        // writable channel: the kernel takes it all, nothing can be stuck
        // here. Small hits skip reading the option (a chain of dynamic
        // casts inside NIO) on almost every request.
        guard handed - handedAtLook >= Self.lookEvery || !context.channel.isWritable else { return }
        handedAtLook = handed
        let pending = Self.queuedBytes(context)
        guard pending > 0 else { return }
        written = handed - Int64(pending)
        lastProgress = .now()
        schedule(context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    private func schedule(_ context: ChannelHandlerContext) {
        let tick = TimeAmount.nanoseconds(max(limit.nanoseconds / 4, 10_000_000))
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(in: tick) {
            let (handler, context) = loopBound.value
            handler.timer = nil
            handler.check(context)
        }
    }

    private func check(_ context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        let pending = Self.queuedBytes(context)
        guard pending > 0 else { return }  // all written: the next flush looks again
        let now = NIODeadline.now()
        let writtenNow = handed - Int64(pending)
        if writtenNow > written {
            written = writtenNow
            lastProgress = now
        } else if now - lastProgress >= limit {
            onTimeout()
            context.close(promise: nil)
            return
        }
        schedule(context)
    }

    static let lookEvery: Int64 = 64 * 1024

    private static func queuedBytes(_ context: ChannelHandlerContext) -> Int {
        (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
    }
}
