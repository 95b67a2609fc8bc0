import AsyncHTTPClient
import NIOConcurrencyHelpers
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
/// One connection per download, closed after its body: a blob download is
/// long, and a connection that carried one has no use a pool would gain
/// much from. What a pool would save (a TCP and TLS handshake, HTTP/2 to a
/// TLS upstream that offers it) matters for short answers, so manifests and
/// upstreams that redirect their blobs (to a CDN, whose hops
/// AsyncHTTPClient makes anyway) keep AsyncHTTPClient's kept-alive
/// connections (`UpstreamClient.ownConnection`). The download's waits are
/// AsyncHTTPClient's: the connect timeout (with the TLS handshake), the
/// answer timeout from the start to the head, and the body's idle timeout,
/// which the fill times (`UpstreamBody`).
enum FillDownload {
    /// How many reads may wait for the fill's task (the producer's high
    /// watermark counts parts, one per read): reads stop once a burst is
    /// handed on, and the next burst is read while the task works on its
    /// last part. A download holds ~2 MiB of reads at most (the burst
    /// handed on and the one being read) besides the fill's batches,
    /// whatever the blob's size (more read-ahead bought no
    /// CPU here and cost peak RSS). One exception: an upstream that closes
    /// after its body anyway (HTTP/1.0, its own `Connection: close`) makes
    /// NIO read all the socket holds once it sees the close, back-pressure
    /// or not: up to the socket's receive buffer (`net.ipv4.tcp_rmem`'s
    /// largest, 6 MiB by default) more, for the rest of that body.
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
        // No `connection: close`, though the connection carries one request:
        // an upstream that closes after its last byte makes NIO read all the
        // socket holds at once, past the body's back-pressure (its EOF read
        // ignores `autoRead`). The handler closes it after the body instead.
        let request = HTTPRequestHead(version: .http1_1, method: .GET, uri: path, headers: headers)
        let answer = loop.makePromise(of: HTTPClientResponse.self)
        // Given up (cancelled, or no answer in time): a connection made
        // after that is closed without sending the request.
        let givenUp = NIOLockedValueBox(false)
        let connected = LoopUpstreamPool.connect(to: upstream, tls: tls, on: loop, timeout: connectTimeout) { channel in
            try channel.pipeline.syncOperations.addHTTPClientHandlers(leftOverBytesStrategy: .dropBytes)
            // Once per connection attempt (NIO races a name's addresses):
            // only the attempt that wins is given the answer to complete.
            try channel.pipeline.syncOperations.addHandler(FillDownloadHandler())
        }
        let giveUp: @Sendable (any Error) -> Void = { error in
            givenUp.withLockedValue { $0 = true }
            answer.fail(error)
            // On the channel's loop already: `connected` is its bootstrap's.
            connected.whenSuccess { closeBelowTLS($0) }
        }
        // The answer timeout runs from the start, connecting included, as
        // it does for AsyncHTTPClient's requests (`UpstreamClient.execute`):
        // an upstream slow to connect gets the same 504 in the same time.
        let deadline = loop.scheduleTask(in: answerTimeout) { giveUp(UpstreamFailure.answer) }
        answer.futureResult.whenComplete { _ in deadline.cancel() }
        connected.whenComplete { result in
            switch result {
            case .failure(let error):
                answer.fail(error)
            case .success(let channel):
                guard !givenUp.withLockedValue({ $0 }) else { return channel.close(promise: nil) }
                // Reads are asked for by the handler from here on, as the
                // fill's task makes room; set after the TLS handshake, which
                // needs reads of its own.
                do {
                    try channel.syncOptions?.setOption(.autoRead, value: false)
                    // NIO keeps one receive buffer per read of a burst and
                    // reuses it once the fill's task has let go of its
                    // bytes: four, one burst's worth (a buffer still held
                    // when the next burst is read is replaced by a new one).
                    try channel.syncOptions?.setOption(.maxMessagesPerRead, value: 4)
                    try channel.syncOptions?.setOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(
                        minimum: 64 * 1024, initial: largestRead, maximum: largestRead))
                    let handler = try channel.pipeline.syncOperations.handler(type: FillDownloadHandler.self)
                    handler.send(request, answer: answer)
                } catch {
                    answer.fail(error)
                    channel.close(promise: nil)
                }
            }
        }
        return try await withTaskCancellationHandler {
            try await answer.futureResult.get()
        } onCancel: {
            giveUp(CancellationError())
        }
    }
}

extension FillDownload {
    /// Closes a download's connection below its TLS handler, if it has one:
    /// no `close_notify` exchange. NIOSSL's own close waits for the
    /// upstream's, and in TLS 1.3 an upstream may go on sending the body
    /// after ours (Go's servers write to its end): a download given up
    /// mid-body would be read on at full speed until NIOSSL's 5 s shutdown
    /// timeout, its slot already another's (or, reads asked for one at a
    /// time, linger that long). Nothing after the body, or after giving it
    /// up, is wanted from this connection, so a clean TLS close buys
    /// nothing. On the channel's event loop.
    static func closeBelowTLS(_ channel: any Channel) {
        guard channel.isActive else { return }
        if let tls = try? channel.pipeline.syncOperations.context(handlerType: NIOSSLClientHandler.self) {
            tls.close(promise: nil)
        } else {
            channel.close(promise: nil)
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
    /// From the request's send until the head is handed on, or the wait
    /// fails: an attempt NIO gave up (another address of the name won)
    /// has none to fail. Not kept after: the
    /// answer holds the body, whose delegate holds this handler, and a body
    /// dropped unread (a redirect's) must free them all and close the
    /// connection (`Demand.didTerminate`), not keep them in a cycle.
    private var answer: EventLoopPromise<HTTPClientResponse>?
    private var context: ChannelHandlerContext?
    private var source: Body.Source?
    /// Since when the download has waited for the upstream's bytes with
    /// room for them (the last hand-on, or the consumer's demand), and
    /// whether that quiet spell has been told (`FillDownloadStateMachine.quiet`).
    /// One timer, re-armed from where it fires rather than per read.
    private var waitingSince = NIODeadline.now()
    private var quietTold = true
    private var quietTimer: Scheduled<Void>?

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    /// A connect that failed removes the handlers without `channelInactive`.
    func handlerRemoved(context: ChannelHandlerContext) {
        act(machine.failed(transport: true))
        self.context = nil
    }

    /// Writes the request and reads for its answer, which completes
    /// `answer` (its deadline is `FillDownload.get`'s).
    func send(_ request: HTTPRequestHead, answer: EventLoopPromise<HTTPClientResponse>) {
        self.answer = answer
        guard let context else { return act(machine.failed(transport: true)) }
        context.write(wrapOutboundOut(.head(request)), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
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
        switch error {
        case NIOSSLError.uncleanShutdown:
            // A TLS upstream that closes without `close_notify`: the close
            // that follows says whether the body was whole (the decoder
            // fails a body short of its length; one delimited by the close
            // ends there, and its digest is checked like any other).
            return
        case HTTPParserError.invalidEOFState:
            // The connection closed inside the answer: a cut, not garbage.
            act(machine.failed(transport: true))
        default:
            act(machine.failed(transport: !(error is HTTPParserError)))
        }
    }

    private func act(_ action: FillDownloadStateMachine.Action) {
        switch action {
        case .none:
            break
        case .read:
            context?.read()
        case .answer(let head):
            guard let context, let answer else { return }
            self.answer = nil
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
            if parts.contains(where: { $0.readableBytes > 0 }) { startWaiting() }
            if end {
                source.finish()
                self.source = nil
                close()
            } else if case .dropped = result {
                act(machine.consumerLeft())
            } else {
                act(machine.yielded(more: result == .produceMore))
            }
        case .fail(let failure, let parts, let headAnswered):
            if headAnswered {
                if !parts.isEmpty { _ = source?.yield(contentsOf: parts) }
                source?.finish(failure)
                source = nil
            } else {
                answer?.fail(failure)
                answer = nil
            }
            close()
        case .close:
            close()
        }
    }

    /// The download waits for the upstream from now: a quiet spell of
    /// `BlobSink.flushAfter` from here is a pause.
    private func startWaiting() {
        waitingSince = .now()
        quietTold = false
        armQuietTimer()
    }

    /// Fires `BlobSink.flushAfter` after the wait began, once per quiet
    /// spell; while bytes keep coming it moves on without a word. A wait
    /// for the consumer (reads stopped while it is full: a slow disk, a
    /// slow follower) is not the upstream's pause: the machine says nothing
    /// then, and the consumer's demand starts a new wait.
    private func armQuietTimer() {
        guard quietTimer == nil, let context else { return }
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let after = TimeAmount(BlobSink.flushAfter)
        quietTimer = context.eventLoop.scheduleTask(deadline: waitingSince + after) {
            let handler = loopBound.value
            handler.quietTimer = nil
            guard !handler.quietTold else { return }
            if NIODeadline.now() - handler.waitingSince >= after {
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
        FillDownload.closeBelowTLS(context.channel)
    }

    /// The body consumer's side: more wanted, or gone. Called from its
    /// task's thread; the handler is reached on its loop.
    struct Demand: NIOAsyncSequenceProducerDelegate {
        let loop: any EventLoop
        let handler: NIOLoopBound<FillDownloadHandler>

        func produceMore() {
            loop.execute {
                let handler = handler.value
                let action = handler.machine.demanded()
                if case .read = action { handler.startWaiting() }
                handler.act(action)
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
