import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS

/// Kept-alive HTTP/1.1 connections to upstreams, one set per
/// event loop, for the exchanges the event loop makes itself (a tag's
/// `HEAD`, `TagLookup`).
///
/// Why not AsyncHTTPClient, as everywhere else: a manifest pull by tag is
/// one upstream `HEAD` and a body from memory, and through the async side it
/// cost two task hops plus AsyncHTTPClient's request cycle: 363 µs of CPU
/// against nginx's 58 (benchmarks/RESULTS.md). Here the client connection,
/// the upstream connection and every callback share one event loop, so a
/// tag answered from memory never leaves it. Each loop owns its own pool,
/// so no lock is taken for it (a TLS upstream's context is looked up in
/// `UpstreamClient`'s sessions, under their lock).
///
/// What it leaves to `UpstreamClient`: upstreams with an account (token
/// exchanges), bodies, redirects. A TLS upstream is spoken to with the same
/// settings (`ca_file`, client certificate, `insecure`) as there: the
/// `NIOSSLContext` made with the upstream's session, shared by every loop. Requests here are
/// bodyless and idempotent (`HEAD`), so one that fails on a reused
/// connection before any answer (the upstream's keep-alive timeout closed
/// it) is sent again on a fresh one.
final class LoopUpstreamPool: Sendable {
    /// Idle connections kept per upstream per loop; more are closed after
    /// their answer.
    static let idlePerUpstream = 32
    /// Exchanges in flight per upstream per loop. Beyond it a tag goes the
    /// async way, whose pool queues at 64 connections per host: a burst of
    /// pulls must not open a connection each to the registry.
    static let busyPerUpstream = 32
    /// An idle connection is closed after this long unused (AsyncHTTPClient's
    /// pool uses the same).
    static let idleTimeout = TimeAmount.seconds(60)

    private let loops: [ObjectIdentifier: NIOLoopBoundBox<Connections>]
    private let connectTimeout: TimeAmount
    /// The TLS context of a TLS upstream, from its session (`UpstreamClient`).
    private let tls: @Sendable (ProxyConfig.Upstream) -> UpstreamClient.LoopTLS?

    init(group: any EventLoopGroup, connectTimeout: TimeAmount,
         tls: @escaping @Sendable (ProxyConfig.Upstream) -> UpstreamClient.LoopTLS?) {
        var loops: [ObjectIdentifier: NIOLoopBoundBox<Connections>] = [:]
        for loop in group.makeIterator() {
            loops[ObjectIdentifier(loop)] = NIOLoopBoundBox.makeBoxSendingValue(Connections(), eventLoop: loop)
        }
        self.loops = loops
        self.connectTimeout = connectTimeout
        self.tls = tls
    }

    /// Whether the event loop can ask `upstream` itself.
    static func serves(_ upstream: ProxyConfig.Upstream) -> Bool {
        (upstream.schema == "http" || upstream.schema == "https") && upstream.credentials == nil
    }

    /// Sends `request` (a whole `HEAD`, as bytes) to `upstream` on a
    /// connection of `loop`; `completion` gets the answer's head (or the
    /// failure) on `loop`, once. False, having done nothing, when `loop` has
    /// no pool (not one of the server's loops) or no room. Must be called on
    /// `loop`. A closure, not a future: one promise and its callback list
    /// less per pull by tag.
    func ask(_ request: ByteBuffer, to upstream: ProxyConfig.Upstream, on loop: any EventLoop,
             within answer: TimeAmount,
             completion: @escaping (Result<UpstreamAnswerHead, any Error>) -> Void) -> Bool {
        guard let connections = loops[ObjectIdentifier(loop)]?.value else { return false }
        var tls: UpstreamClient.LoopTLS?
        if upstream.schema == "https" {
            guard let context = self.tls(upstream) else { return false }
            tls = context
        }
        let key = Connections.Key(registry: upstream.registry, port: upstream.port, tls: tls?.number ?? 0)
        let address = connections.address(key)
        guard address.startExchange() else { return false }
        let exchange = Exchange(request: request, upstream: upstream, address: address, tls: tls?.context,
                                connections: connections, answer: answer, loop: loop, completion: completion)
        if let kept = address.take() {
            // Closed while idle, most likely by the upstream's own keep-alive
            // timeout, before any answer: once more, on a new connection.
            send(exchange, on: kept) { self.connect(exchange) }
        } else {
            connect(exchange)
        }
        return true
    }

    /// One request on its way, whichever connection carries it. A class:
    /// it rides in the connection's callbacks, and a struct's copies each
    /// retained the upstream's settings field by field.
    private final class Exchange {
        let request: ByteBuffer
        let upstream: ProxyConfig.Upstream
        let address: Connections.Address
        let tls: NIOSSLContext?
        let connections: Connections
        let answer: TimeAmount
        let loop: any EventLoop
        let completion: (Result<UpstreamAnswerHead, any Error>) -> Void

        init(request: ByteBuffer, upstream: ProxyConfig.Upstream, address: Connections.Address, tls: NIOSSLContext?,
             connections: Connections, answer: TimeAmount, loop: any EventLoop,
             completion: @escaping (Result<UpstreamAnswerHead, any Error>) -> Void) {
            (self.request, self.upstream, self.address, self.tls) = (request, upstream, address, tls)
            (self.connections, self.answer, self.loop, self.completion) = (connections, answer, loop, completion)
        }

        /// The exchange is over: counted out, then its answer or failure
        /// handed on.
        func finish(_ result: Result<UpstreamAnswerHead, any Error>) {
            address.endExchange()
            completion(result)
        }
    }

    private func connect(_ exchange: Exchange) {
        let connect = Self.connect(to: exchange.upstream, tls: exchange.tls, on: exchange.loop,
                                   timeout: connectTimeout) { channel in
            try channel.pipeline.syncOperations.addHandler(UpstreamExchangeHandler(eventLoop: channel.eventLoop))
        }
        // The connection is made on the loop the pool belongs to.
        connect.assumeIsolated().whenComplete { result in
            switch result {
            case .failure(let error):
                exchange.finish(.failure(error))
            case .success(let channel):
                guard let handler = try? channel.pipeline.syncOperations.handler(type: UpstreamExchangeHandler.self)
                else {
                    channel.close(promise: nil)
                    exchange.finish(.failure(UpstreamExchangeStateMachine.Failure.closed))
                    return
                }
                self.send(exchange, on: Connections.Kept(channel: channel, handler: handler), retry: nil)
            }
        }
    }

    /// A connection to `upstream` made on `loop`, through TLS when `tls`
    /// is given, and usable once the handshake is done: `addHandlers` puts
    /// the connection's own handlers after TLS. Shared with the fills' own
    /// connections (`FillDownload`).
    static func connect(to upstream: ProxyConfig.Upstream, tls: NIOSSLContext?, on loop: any EventLoop,
                        timeout: TimeAmount,
                        addHandlers: @escaping @Sendable (any Channel) throws -> Void) -> EventLoopFuture<any Channel> {
        // A registry written as an IPv6 literal (`[::1]`) is connected to
        // without its brackets, as AsyncHTTPClient does.
        var host = Substring(upstream.registry)
        if host.hasPrefix("["), host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        let address = String(host)
        // The name a certificate must carry, also sent as SNI; an address
        // is checked against the certificate's IP entries instead (SNI
        // carries no address), as AsyncHTTPClient does.
        let serverName = (try? SocketAddress(ipAddress: address, port: 0)) == nil ? address : nil
        // The TLS handshake is part of connecting, under the same deadline
        // (AsyncHTTPClient's too): an upstream that takes the connection and
        // never speaks TLS is unreachable after `connect`, not silent until
        // the answer's wait ends.
        let deadline = NIODeadline.now() + timeout
        return ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            // `tcpOption`, not `socketOption`: the latter sets the name at
            // `SOL_SOCKET`, where TCP_NODELAY's number is SO_DEBUG, which
            // needs CAP_NET_ADMIN: as any user but root every connect failed.
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(
                            NIOSSLClientHandler(context: tls, serverHostname: serverName))
                        try channel.pipeline.syncOperations.addHandler(
                            TLSHandshakeWait(channel.eventLoop.makePromise()))
                    }
                    try addHandlers(channel)
                }
            }
            .connect(host: address, port: upstream.port)
            .flatMap { channel in
                guard let wait = try? channel.pipeline.syncOperations.handler(type: TLSHandshakeWait.self) else {
                    return channel.eventLoop.makeSucceededFuture(channel)
                }
                let done = wait.done
                let timeout = channel.eventLoop.scheduleTask(deadline: deadline) {
                    done.fail(TLSHandshakeWait.TimedOut())
                }
                return done.futureResult.map { channel }.flatMapErrorThrowing { error in
                    channel.close(promise: nil)
                    throw error
                }.always { _ in timeout.cancel() }
            }
    }

    /// Sends on `kept`; `retry` runs instead of failing when the connection
    /// turns out closed before any answer.
    private func send(_ exchange: Exchange, on kept: Connections.Kept, retry: (() -> Void)?) {
        kept.handler.ask(exchange.request, within: exchange.answer) { result in
            switch result {
            case .success(let reply):
                // The connection goes back to the pool when it may carry
                // another request, and is closed otherwise.
                if reply.reusable, kept.channel.isActive {
                    exchange.connections.put(kept, at: exchange.address)
                } else {
                    kept.channel.close(promise: nil)
                }
                exchange.finish(.success(reply.head))
            case .failure(UpstreamExchangeStateMachine.Failure.closed) where retry != nil:
                retry?()
            case .failure(let error):
                // Neither back to the pool nor left open outside it (a
                // request refused before it was written leaves it open).
                kept.channel.close(promise: nil)
                exchange.finish(.failure(error))
            }
        }
    }

    /// One loop's idle connections, by upstream address (and the TLS
    /// context's number for a TLS upstream). Only its loop touches it.
    final class Connections {
        struct Key: Hashable {
            let registry: String
            let port: Int
            /// The TLS context's number; 0 for plaintext.
            let tls: Int
        }

        struct Kept {
            let channel: any Channel
            let handler: UpstreamExchangeHandler
        }

        struct Idle {
            let kept: Kept
            let since: NIODeadline
        }

        /// What the loop has with one upstream address: its idle
        /// connections and its exchanges in flight. Looked up once per
        /// exchange and held by it: counting in, taking a connection,
        /// putting it back and counting out were each a dictionary look-up,
        /// ~3,300 instructions a pull by tag (`benchmarks/callgrind.sh`).
        final class Address {
            fileprivate(set) var idle: [Idle] = []
            private var busy = 0

            /// Counts an exchange in, unless the address has its fill here.
            func startExchange() -> Bool {
                guard busy < LoopUpstreamPool.busyPerUpstream else { return false }
                busy += 1
                return true
            }

            func endExchange() {
                busy = max(0, busy - 1)
            }

            /// The most recently used idle connection still open and not
            /// idle past the timeout (the warmest, and the least likely to
            /// have met the upstream's own idle timeout).
            func take() -> Kept? {
                let oldest = NIODeadline.now() - LoopUpstreamPool.idleTimeout
                while let last = idle.popLast() {
                    if last.kept.handler.isIdle, last.since > oldest { return last.kept }
                    last.kept.channel.close(promise: nil)
                }
                return nil
            }

            /// Closes what sat idle since before `oldest` or was closed.
            fileprivate func sweep(before oldest: NIODeadline) {
                idle.removeAll { entry in
                    guard entry.since <= oldest || !entry.kept.handler.isIdle else { return false }
                    entry.kept.channel.close(promise: nil)
                    return true
                }
            }
        }

        /// One per address ever asked from this loop: a handful (the
        /// configured upstreams), kept for the loop's life.
        private var addresses: [Key: Address] = [:]
        /// Closes what sat idle too long. One timer per loop, running only
        /// while connections are idle, instead of one scheduled and
        /// cancelled per exchange (a timer-heap insert and removal each, on
        /// every tag pull).
        private var sweep: Scheduled<Void>?

        func address(_ key: Key) -> Address {
            if let address = addresses[key] { return address }
            let address = Address()
            addresses[key] = address
            return address
        }

        func put(_ kept: Kept, at address: Address) {
            guard address.idle.count < LoopUpstreamPool.idlePerUpstream else {
                kept.channel.close(promise: nil)
                return
            }
            address.idle.append(Idle(kept: kept, since: .now()))
            if sweep == nil { scheduleSweep(on: kept.channel.eventLoop) }
        }

        /// Every half idle timeout while any connection is idle: a
        /// connection is closed between one and one and a half idle
        /// timeouts after its last answer.
        private func scheduleSweep(on loop: any EventLoop) {
            let loopBound = NIOLoopBound(self, eventLoop: loop)
            sweep = loop.scheduleTask(in: .nanoseconds(LoopUpstreamPool.idleTimeout.nanoseconds / 2)) {
                let connections = loopBound.value
                connections.sweep = nil
                let oldest = NIODeadline.now() - LoopUpstreamPool.idleTimeout
                for address in connections.addresses.values { address.sweep(before: oldest) }
                if connections.addresses.values.contains(where: { !$0.idle.isEmpty }) {
                    connections.scheduleSweep(on: loop)
                }
            }
        }
    }
}

/// Completes `done` when the TLS handshake does, or fails it with what
/// ended it first (the handshake's own error, kept for the log: a wrong
/// `ca_file` or name says so, not "malformed"). Its connection's deadline
/// is set by `LoopUpstreamPool.connect`.
final class TLSHandshakeWait: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = NIOAny

    struct TimedOut: Error, CustomStringConvertible {
        var description: String { "the upstream's TLS handshake did not finish within the connect timeout" }
    }

    let done: EventLoopPromise<Void>

    init(_ done: EventLoopPromise<Void>) {
        self.done = done
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        context.fireUserInboundEventTriggered(event)
        if case TLSUserEvent.handshakeCompleted = event {
            done.succeed(())
            // Its work is done: the connection's reads no longer pass here.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        }
    }

    /// Also when the connect itself failed: NIO then closes the channel
    /// without `channelInactive` or an error, only removing its handlers
    /// (a refused address, or one Happy Eyeballs gave up on), and the
    /// promise must not be left unfulfilled.
    func handlerRemoved(context: ChannelHandlerContext) {
        done.fail(UpstreamExchangeStateMachine.Failure.closed)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        done.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        done.fail(UpstreamExchangeStateMachine.Failure.closed)
        context.fireChannelInactive()
    }
}
