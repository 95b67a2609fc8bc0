import AsyncHTTPClient
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import ProxyMetrics
import ServiceLifecycle

/// The proxy as a service: binds the listener, serves connections, and on
/// graceful shutdown stops accepting, turns `/readyz` to 503, lets in-flight
/// responses and fills finish (up to `timeouts.shutdown`), then returns.
public final class ProxyServer: Service, Sendable {
    public let config: ProxyConfig
    public let metrics: ProxyMetrics
    public let store: BlobStore
    public let fills: FillRegistry
    let client: UpstreamClient
    let handler: RequestHandler
    let hits: CacheHitResponder
    let tracker = ConnectionTracker()
    let group: any EventLoopGroup
    let logger: Logger
    private let bound = AsyncStream<Int>.makeStream()

    public init(config: ProxyConfig, logger: Logger, metrics: ProxyMetrics = ProxyMetrics(),
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                threadPool: NIOThreadPool = .singleton) throws {
        self.config = config
        self.metrics = metrics
        self.group = group
        self.logger = logger
        self.store = try BlobStore(folder: config.storage.folder, metrics: metrics, logger: logger)
        self.client = UpstreamClient(eventLoopGroup: group, timeouts: config.timeouts)
        let writer = IOBackend.select(pool: threadPool, logger: logger)
        metrics.setIOBackend(writer.backendName)
        self.fills = FillRegistry(context: FillContext(
            client: client, store: store, writer: writer, metrics: metrics,
            fsync: config.storage.fsync, logger: logger))
        let passThrough = PassThrough(client: client, metrics: metrics)
        let router = Router(upstreams: config.upstreams)
        self.handler = RequestHandler(
            router: router,
            blobs: BlobResponder(store: store, fills: fills, passThrough: passThrough, metrics: metrics),
            passThrough: passThrough, metrics: metrics, tracker: tracker, logger: logger)
        self.hits = CacheHitResponder(router: router, store: store, metrics: metrics, tracker: tracker,
                                      smallBlobs: SmallBlobCache())
    }

    /// The port the listener is bound to, once it is (port 0 in tests).
    public func boundPort() async -> Int? {
        var iterator = bound.stream.makeAsyncIterator()
        return await iterator.next()
    }

    public func run() async throws {
        let config = self.config
        let headTimeout = TimeAmount.milliseconds(Int64(config.timeouts.headerReadSeconds * 1000))
        let hits = self.hits
        let listener = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            .bind(host: config.api.hostname, port: config.api.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    let state = RequestHeadState()
                    let sync = channel.pipeline.syncOperations
                    // Outbound header validation is off: every header value
                    // the proxy sends is its own or was parsed from an
                    // upstream response by a validating parser, and on the
                    // 4 KiB hit path the check cost several percent.
                    try sync.configureHTTPServerPipeline(withErrorHandling: true, withOutboundHeaderValidation: false)
                    try sync.addHandler(RequestHeadLimiter(state: state, limit: config.maxHeaderBytes), position: .first)
                    try sync.addHandler(RequestHeadDeadline(state: state, timeout: headTimeout))
                    try sync.addHandler(CacheHitHandler(hits: hits))
                    return try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(
                        wrappingChannelSynchronously: channel)
                }
            }
        let port = listener.channel.localAddress?.port ?? config.api.port
        bound.continuation.yield(port)
        logger.info("listening", metadata: ["address": "\(config.api.hostname):\(port)"])

        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                try await listener.executeThenClose { connections in
                    for try await connection in connections {
                        metrics.connectedClients.increment()
                        group.addTask {
                            await ClientConnection(channel: connection, handler: self.handler, tracker: self.tracker).serve()
                            self.metrics.connectedClients.decrement()
                        }
                    }
                }
            }
        } onGracefulShutdown: {
            self.logger.info("shutting down: no new connections, finishing in-flight work")
            self.tracker.drain()  // also turns /readyz to 503
            listener.channel.close(promise: nil)
            // Responses still running when the shutdown timeout passes are cut.
            let tracker = self.tracker
            let timeout = Duration.milliseconds(Int64(config.timeouts.shutdownSeconds * 1000))
            Task {
                try? await Task.sleep(for: timeout)
                tracker.closeAll()
            }
        }
        await finishFills()
        try? await client.shutdown()
        logger.info("stopped")
    }

    /// Lets running fills complete (so their blobs are kept) for up to the
    /// shutdown timeout, then stops the rest; their temporary files go.
    private func finishFills() async {
        let timeout = Duration.milliseconds(Int64(config.timeouts.shutdownSeconds * 1000))
        await withTaskGroup(of: Bool.self) { group in
            group.addTask { await self.fills.drain(); return true }
            group.addTask { try? await Task.sleep(for: timeout); return false }
            if await group.next() == false {
                logger.warning("shutdown timeout: abandoning unfinished fills")
                fills.cancelAll()
                tracker.closeAll()
            }
            group.cancelAll()
        }
    }
}
