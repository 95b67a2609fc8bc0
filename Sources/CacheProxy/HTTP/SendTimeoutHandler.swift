import NIOCore

/// Cuts a connection whose response has stopped moving: the client asked for
/// bytes and does not read them (nginx's `send_timeout`). Without it a client
/// that never reads holds a socket, a file descriptor and the bytes queued
/// for it forever.
///
/// It measures progress, not duration: a 1 GB layer to a client on a slow
/// link takes minutes and must never be cut while it moves. Progress is the
/// channel's queue of unwritten bytes shrinking (NIO counts file regions in
/// it, and a partial `sendfile` shrinks it). The queue is looked at after
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
    /// Queued bytes at the last look, and when they last went down.
    private var queued = 0
    private var lastProgress = NIODeadline.now()

    init(limit: TimeAmount, onTimeout: @escaping @Sendable () -> Void) {
        self.limit = limit
        self.onTimeout = onTimeout
    }

    func flush(context: ChannelHandlerContext) {
        context.flush()
        guard timer == nil else { return }
        let pending = Self.queuedBytes(context)
        guard pending > 0 else { return }
        queued = pending
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
        if pending < queued {
            lastProgress = now
        } else if now - lastProgress >= limit {
            onTimeout()
            context.close(promise: nil)
            return
        }
        queued = pending
        schedule(context)
    }

    private static func queuedBytes(_ context: ChannelHandlerContext) -> Int {
        (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 0
    }
}
