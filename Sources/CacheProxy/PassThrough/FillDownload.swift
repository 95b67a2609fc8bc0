import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import NIOSSL

/// A fill's `GET` to its upstream on a connection of its own, read in
/// large pieces: the first hop of `UpstreamClient.getBlob` for an upstream
/// the event loops can reach themselves (`LoopUpstreamPool.serves`).
///
/// Why not AsyncHTTPClient, as for the redirects that follow: its body
/// stream reads 64 KiB at a time and hands each piece from the event loop
/// to the fill's task, and asks the loop for the next read only once the
/// task took it: one hop each way per 64 KiB, and reading and hashing take
/// turns. Here the loop reads up to 256 KiB at a time (up to four reads
/// when the socket has more), hands on what one read burst brought in one
/// go, and reads the next burst while the task hashes and writes this one.
/// Measured on 64 MiB cold fills (`benchmarks/cold_ab.sh`): ~1,000 context
/// switches per fill instead of ~1,600, and 0.1-0.3 s/GB less CPU.
///
/// One connection per download, closed at its end (`connection: close`):
/// a fill is long, and a connection that carried one has no use a pool
/// would gain much from. The download's waits are the same as
/// AsyncHTTPClient's here: the connect timeout (with the TLS handshake), the
/// answer timeout from the request's end to the head, and the body's idle
/// timeout, which the fill times (`UpstreamBody`).
enum FillDownload {
    /// How many read bursts may wait for the fill's task while it works on
    /// the one before. One: the read ahead overlaps the hashing, and a
    /// download holds ~2 MiB of bursts at most besides the fill's batches,
    /// whatever the blob's size (more bought no CPU and cost peak RSS).
    static let bufferedBursts = 1
    /// The receive buffer grows to this when reads fill it. Below glibc's
    /// mapping threshold (`FreedMemory.mapAllocations`): a buffer NIO could
    /// not reuse comes from an arena, not from pages mapped afresh (1 MiB
    /// reads cost ~13,000 page faults per 64 MiB fill here).
    static let largestRead = 256 * 1024

    /// Sends `GET path` to `upstream` on a new connection of `loop`; returns
    /// once the answer's head is in, with its body as a stream. Cancelling
    /// the calling task, or dropping the body unread, closes the connection.
    static func get(path: String, headers: HTTPHeaders, upstream: ProxyConfig.Upstream, tls: NIOSSLContext?,
                    on loop: any EventLoop, connectTimeout: TimeAmount,
                    answerTimeout: TimeAmount) async throws -> HTTPClientResponse {
        var headers = headers
        headers.replaceOrAdd(name: "host", value: upstream.authority)
        headers.replaceOrAdd(name: "connection", value: "close")
        let request = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: headers)
        let answer = loop.makePromise(of: HTTPClientResponse.self)
        let connected = LoopUpstreamPool.connect(to: upstream, tls: tls, on: loop, timeout: connectTimeout) { channel in
            try channel.pipeline.syncOperations.addHTTPClientHandlers(leftOverBytesStrategy: .dropBytes)
            try channel.pipeline.syncOperations.addHandler(FillDownloadHandler(answer: answer))
        }
        connected.whenComplete { result in
            switch result {
            case .failure(let error):
                answer.fail(error)
            case .success(let channel):
                // Reads are asked for by the handler from here on, as the
                // fill's task makes room; set after the TLS handshake, which
                // needs reads of its own.
                do {
                    try channel.syncOptions?.setOption(.autoRead, value: false)
                    // NIO keeps one receive buffer per read of a burst and
                    // reuses it once the fill's task has let go of its
                    // bytes: four, for a burst and the one before it.
                    try channel.syncOptions?.setOption(.maxMessagesPerRead, value: 4)
                    try channel.syncOptions?.setOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(
                        minimum: 64 * 1024, initial: largestRead, maximum: largestRead))
                    let handler = try channel.pipeline.syncOperations.handler(type: FillDownloadHandler.self)
                    handler.send(request, answerWithin: answerTimeout)
                } catch {
                    answer.fail(error)
                    channel.close(promise: nil)
                }
            }
        }
        return try await withTaskCancellationHandler {
            try await answer.futureResult.get()
        } onCancel: {
            answer.fail(CancellationError())
            connected.whenSuccess { $0.close(promise: nil) }
        }
    }
}

/// Drives `FillDownloadStateMachine` for one download: the last handler of
/// its pipeline, after NIO's HTTP/1.1 codec (and TLS, if any). Lives on its
/// channel's event loop, like everything that touches it.
final class FillDownloadHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundOut = HTTPClientRequestPart

    typealias Body = NIOThrowingAsyncSequenceProducer<
        ByteBuffer, any Error, NIOAsyncSequenceProducerBackPressureStrategies.HighLowWatermark, Demand>

    private var machine = FillDownloadStateMachine()
    private let answer: EventLoopPromise<HTTPClientResponse>
    private var context: ChannelHandlerContext?
    private var source: Body.Source?
    private var deadline: Scheduled<Void>?
    /// When bytes were last handed on, and whether the quiet spell since
    /// has been told (`FillDownloadStateMachine.quiet`). One timer, re-armed
    /// from where it fires rather than per read.
    private var lastHandOn = NIODeadline.now()
    private var quietTold = true
    private var quietTimer: Scheduled<Void>?

    init(answer: EventLoopPromise<HTTPClientResponse>) {
        self.answer = answer
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// A connect that failed removes the handlers without `channelInactive`.
    func handlerRemoved(context: ChannelHandlerContext) {
        act(machine.failed(transport: true))
        self.context = nil
    }

    func send(_ request: HTTPRequestHead, answerWithin timeout: TimeAmount) {
        guard let context else { return act(machine.failed(transport: true)) }
        context.write(wrapOutboundOut(.head(request)), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: timeout) {
            let handler = loopBound.value
            handler.act(handler.machine.timedOut())
        }
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head): act(machine.receivedHead(head))
        case .body(let part): act(machine.receivedBody(part))
        case .end: act(machine.receivedEnd())
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        act(machine.readComplete())
    }

    func channelInactive(context: ChannelHandlerContext) {
        act(machine.failed(transport: true))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        act(machine.failed(transport: !(error is HTTPParserError)))
    }

    private func act(_ action: FillDownloadStateMachine.Action) {
        switch action {
        case .none:
            break
        case .read:
            context?.read()
        case .answer(let head):
            deadline?.cancel()
            deadline = nil
            guard let context else { return }
            let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let body = Body.makeSequence(
                backPressureStrategy: .init(lowWatermark: 1, highWatermark: FillDownload.bufferedBursts),
                finishOnDeinit: true,
                delegate: Demand(loop: context.eventLoop, handler: loopBound))
            source = body.source
            answer.succeed(HTTPClientResponse(version: head.version, status: head.status, headers: head.headers,
                                              body: .stream(body.sequence)))
            context.read()
        case .yield(let parts, let end):
            guard let source else { return }
            let result = parts.isEmpty ? .produceMore : source.yield(contentsOf: parts)
            if parts.contains(where: { $0.readableBytes > 0 }) {
                lastHandOn = .now()
                quietTold = false
                armQuietTimer()
            }
            if end {
                source.finish()
                close()
            } else if case .dropped = result {
                act(machine.consumerLeft())
            } else {
                act(machine.yielded(more: result == .produceMore))
            }
        case .fail(let failure, let parts, let headAnswered):
            deadline?.cancel()
            deadline = nil
            if headAnswered {
                if !parts.isEmpty { _ = source?.yield(contentsOf: parts) }
                source?.finish(failure)
            } else {
                answer.fail(failure == .timedOut ? UpstreamFailure.answer : failure)
            }
            close()
        case .close:
            close()
        }
    }

    /// Fires `BlobSink.flushAfter` after the last hand-on, once per quiet
    /// spell; while bytes keep coming it moves on without a word.
    private func armQuietTimer() {
        guard quietTimer == nil, let context else { return }
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let after = TimeAmount(BlobSink.flushAfter)
        quietTimer = context.eventLoop.scheduleTask(deadline: lastHandOn + after) {
            let handler = loopBound.value
            handler.quietTimer = nil
            guard !handler.quietTold else { return }
            if NIODeadline.now() - handler.lastHandOn >= after {
                handler.quietTold = true
                handler.act(handler.machine.quiet())
            } else {
                handler.armQuietTimer()
            }
        }
    }

    private func close() {
        quietTimer?.cancel()
        quietTimer = nil
        guard let context, context.channel.isActive else { return }
        context.close(promise: nil)
    }

    /// The body consumer's side: more wanted, or gone. Called from its
    /// task's thread; the handler is reached on its loop.
    struct Demand: NIOAsyncSequenceProducerDelegate {
        let loop: any EventLoop
        let handler: NIOLoopBound<FillDownloadHandler>

        func produceMore() {
            loop.execute {
                let handler = handler.value
                handler.act(handler.machine.demanded())
            }
        }

        func didTerminate() {
            loop.execute {
                let handler = handler.value
                handler.act(handler.machine.consumerLeft())
            }
        }
    }
}
