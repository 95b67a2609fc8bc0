import AsyncHTTPClient
import Crypto
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import ProxyMetrics
import IOURing
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
    /// The configuration in force (reloaded on SIGHUP: `reload`); `config`
    /// is the one the process started with, whose listeners and storage stay.
    public let live: LiveConfig
    /// The log level in force, shared with the process's log handlers.
    public let logLevel: LogLevelSetting
    let tracker = ConnectionTracker()
    let group: any EventLoopGroup
    let logger: Logger
    /// The listener's certificate, when it speaks TLS.
    public let tls: ServerTLS?
    /// Reads cached files on the thread pool: for TLS connections, which
    /// cannot use sendfile, and wherever the page cache lacks a region.
    let fileIO: NonBlockingFileIO
    /// Who may read what, as the upstreams said; written to the storage
    /// folder (`AccessMemory`) every `memoryInterval` and at the end.
    let gate: AccessGate
    /// Each tag's last digests and each upstream's last ping answers,
    /// saved with the gate's tables.
    let tags: TagTable
    let pings: PingMemory
    /// False when the folder's key could not be read: the memory is then
    /// neither loaded nor overwritten.
    private let remembers: Bool
    private let threadPool: NIOThreadPool
    static let memoryInterval: Duration = .seconds(5)
    private let bound = AsyncStream<[Int]>.makeStream()
    /// When the first shutdown signal's grace ends.
    private let shutdownDeadline = NIOLockedValueBox<ContinuousClock.Instant?>(nil)

    public init(config: ProxyConfig, logger: Logger, metrics: ProxyMetrics = ProxyMetrics(),
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                threadPool: NIOThreadPool = .singleton, resolver: any HostResolver = SystemResolver(),
                logLevel: LogLevelSetting? = nil) throws {
        self.config = config
        self.live = LiveConfig(config)
        self.logLevel = logLevel ?? LogLevelSetting(config.logLevel)
        self.metrics = metrics
        self.group = group
        self.logger = logger
        self.fileIO = NonBlockingFileIO(threadPool: threadPool)
        self.threadPool = threadPool
        if let certificate = config.api.tlsCert, let key = config.api.tlsKey {
            self.tls = try ServerTLS(certificate: certificate, key: key)
        } else {
            self.tls = nil
        }
        let writer = try IOBackend.select(config.storage.ioBackend, pool: threadPool, group: group, logger: logger)
        metrics.setIOBackend(writer.backendName)
        do {
            self.store = try BlobStore(config: config.storage, writer: writer, metrics: metrics, logger: logger)
        } catch {
            writer.shutdown()
            throw error
        }
        // After the store: it holds the folder's lock, so no other process
        // writes the memory meanwhile.
        let memory: (key: SymmetricKey, snapshot: AccessMemory.Snapshot)
        do {
            let (key, isNew) = try AccessMemory.key(storage: config.storage.folder, logger: logger)
            memory = (key, isNew ? .init() : AccessMemory.load(storage: config.storage.folder, capacity: 65536,
                                                                upstreams: config.upstreams))
            remembers = true
        } catch let error as AccessMemory.KeyUnreadable {
            logger.warning("offline memory key unreadable: this run neither loads nor saves the offline memory",
                           metadata: ["error": "\(error)"])
            memory = (SymmetricKey(size: .bits256), .init())
            remembers = false
        } catch {
            store.releaseFolder()
            writer.shutdown()
            throw error
        }
        self.client = try UpstreamClient(eventLoopGroup: group, timeouts: config.timeouts,
                                         upstreams: config.upstreams, resolver: resolver, logger: logger)
        Self.warnInsecure(config.upstreams, logger: logger)
        for upstream in config.upstreams where upstream.accessCheck == .never {
            logger.notice("access checks are off for this upstream: any client that knows a digest gets the cached blob",
                          metadata: ["upstream": "\(upstream.host)"])
        }
        logger.info("offline memory loaded", metadata: [
            "grants": "\(memory.snapshot.grants.count)", "links": "\(memory.snapshot.links.count)",
            "tags": "\(memory.snapshot.tags.count)"])
        let gate = AccessGate(client: client, metrics: metrics, key: memory.key, remembered: memory.snapshot)
        self.gate = gate
        self.fills = FillRegistry(context: FillContext(client: client, store: store, gate: gate, metrics: metrics,
                                                       logger: logger),
                                  upstreams: config.upstreams)
        let passThrough = PassThrough(client: client, metrics: metrics)
        let requestLog = RequestLog(format: config.logFormat, level: self.logLevel)
        let tags = TagTable(remembered: memory.snapshot.tags)
        let pings = PingMemory(remembered: memory.snapshot.pings)
        (self.tags, self.pings) = (tags, pings)
        let blobs = BlobResponder(store: store, fills: fills, passThrough: passThrough, gate: gate, metrics: metrics)
        self.handler = RequestHandler(
            live: live,
            blobs: blobs,
            tags: TagResolver(blobs: blobs, tags: tags, client: client, gate: gate, metrics: metrics),
            pings: pings,
            passThrough: passThrough, metrics: metrics, tracker: tracker, logger: logger, requestLog: requestLog,
            trustForwardedHeaders: config.api.trustForwardedHeaders)
        self.hits = CacheHitResponder(live: live, store: store, gate: gate, metrics: metrics, tracker: tracker,
                                      requestLog: requestLog, tags: tags,
                                      upstreams: LoopUpstreamPool(group: group,
                                                                  connectTimeout: .fromSeconds(config.timeouts.connectSeconds),
                                                                  tls: { [client] in client.loopTLS(for: $0) }))
    }

    /// The port the (first) listener is bound to, once it is (port 0 in tests).
    public func boundPort() async -> Int? {
        await boundPorts().first
    }

    /// The ports of all listeners, once bound: `api.port`, then
    /// `api.tls_port` when a TLS listener runs beside the plaintext one.
    public func boundPorts() async -> [Int] {
        var iterator = bound.stream.makeAsyncIterator()
        return await iterator.next() ?? []
    }

    /// The listeners to open: `api.port` alone (TLS when a certificate is
    /// configured and no `tls_port`), or plaintext on `api.port` beside TLS
    /// on `api.tls_port`.
    private var listeners: [(port: Int, tls: ServerTLS?)] {
        guard let tls else { return [(config.api.port, nil)] }
        guard let tlsPort = config.api.tlsPort else { return [(config.api.port, tls)] }
        return [(config.api.port, nil), (tlsPort, tls)]
    }

    /// Said at every start and reload, for each upstream whose
    /// certificates are not checked.
    private static func warnInsecure(_ upstreams: [ProxyConfig.Upstream], logger: Logger) {
        for upstream in upstreams where upstream.tls.insecure {
            logger.warning("INSECURE: TLS certificates of this upstream are NOT verified; anyone on the path can answer for it (blobs and manifests are still checked against their digests; what a tag names is not)",
                           metadata: ["upstream": "\(upstream.host)", "registry": "\(upstream.registry)"])
        }
    }

    /// Reads the listener's certificate and key again (part of `reload`).
    /// New connections get the new ones; open connections are not touched.
    /// A failure keeps the old ones and is logged.
    private func reloadTLS() {
        guard let tls else { return }
        do {
            try tls.reload()
            logger.info("TLS certificate reloaded", metadata: ["certificate": "\(tls.certificatePath)"])
        } catch {
            logger.error("TLS certificate reload failed; the previous certificate stays in use",
                         metadata: ["error": "\(error)"])
        }
    }

    /// SIGHUP: reads the configuration again and puts it in force.
    ///
    /// Upstreams added, removed or changed, their access settings, timeouts,
    /// limits and the log level take effect for new requests and
    /// connections; requests and downloads under way finish as they began
    /// (a download through an upstream just removed completes). The
    /// listener's certificate and key are read again. A file that does not
    /// load changes nothing (one line names the key); a key a running
    /// process cannot change keeps its value, and a line says it needs a
    /// restart.
    public func reload(_ load: () throws -> ProxyConfig) {
        // The certificate is read again whatever becomes of the file: a
        // renewal must not wait for an unrelated typo to be fixed.
        defer { reloadTLS() }
        let loaded: ProxyConfig
        do {
            loaded = try load()
        } catch {
            logger.error("configuration not reloaded; the running one stays", metadata: ["error": "\(error)"])
            return
        }
        let (new, restartOnly) = LiveConfig.keepingRestartOnly(loaded, running: live.config)
        for key in restartOnly {
            logger.warning("configuration key changed but needs a restart; the running value stays",
                           metadata: ["key": "\(key)"])
        }
        do {
            try client.update(upstreams: new.upstreams, timeouts: new.timeouts)
        } catch {
            logger.error("configuration not reloaded; the running one stays", metadata: ["error": "\(error)"])
            return
        }
        fills.update(upstreams: new.upstreams)
        // What the offline memory holds of an upstream now configured
        // otherwise (another registry, access check or account) was the
        // old one's word: forgotten, as at a start with a changed file.
        let before = Dictionary(live.config.upstreams.map { ($0.host, AccessMemory.fingerprint($0)) },
                                uniquingKeysWith: { first, _ in first })
        for upstream in new.upstreams where before[upstream.host].map({ $0 != AccessMemory.fingerprint(upstream) }) ?? false {
            gate.forget(upstream: upstream.host)
            tags.forget(upstream: upstream.host)
            pings.forget(upstream: upstream.host)
            logger.notice("upstream now configured otherwise: its offline memory is forgotten",
                          metadata: ["upstream": "\(upstream.host)"])
        }
        live.replace(with: new)
        Self.warnInsecure(new.upstreams, logger: logger)
        // Said at the level in force until now, then the new level applies.
        logger.info("configuration reloaded", metadata: [
            "upstreams": "\(new.upstreams.map(\.host).joined(separator: ","))", "log_level": "\(new.logLevel)"])
        logLevel.set(new.logLevel)
    }

    private func bind(port: Int, tls: ServerTLS?) async throws
        -> NIOAsyncChannel<AcceptedConnection, Never> {
        let (config, hits, live, metrics, tracker) = (self.config, self.hits, self.live, self.metrics, self.tracker)
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // A burst of connects is accepted in a few loop turns, not four
            // per turn (nginx's `multi_accept`): on a busy loop each turn
            // serves every other connection first, and 1,024 connects took
            // most of a second. Accepted connections then wait for their
            // task in a buffer of up to `highWatermark`, not in the kernel.
            .serverChannelOption(.maxMessagesPerRead, value: 64)
            // At the TCP level (`tcpOption`): `socketOption(.tcp_nodelay)`
            // set SO_DEBUG, which only root may, so the proxy could not
            // start as the unprivileged user its systemd unit runs it as.
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 4)
            // A write the socket took only part of waits for the kernel to
            // say it has room (a third of the send buffer), as nginx does.
            // NIO's default retries at once, up to 16 times: with the client
            // draining on another core, each retry of a large blob's
            // `sendfile` found one segment of room (64 KiB), and those
            // calls cost ~25% more CPU per GB than one large one per wake-up
            // (`benchmarks/big_ab.sh`).
            .childChannelOption(.writeSpin, value: 0)
            .bind(host: config.api.hostname, port: port,
                  serverBackPressureStrategy: .init(lowWatermark: 256, highWatermark: 1024)) { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.current))
                    }
                    // Each new connection takes the timeouts and limits in
                    // force now; open ones keep theirs.
                    let handOff = TagHandOff()
                    try ClientPipeline.configure(channel, config: live.config, hits: hits, metrics: metrics,
                                                 handOff: handOff)
                    let wrapped = try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(
                        wrappingChannelSynchronously: channel)
                    // Tracked from its first byte, not from when its task
                    // starts: the hit paths answer on the event loop before
                    // that, and a drain must see those answers as busy. One
                    // accepted after the drain began is closed unanswered.
                    if tracker.add(channel) {
                        channel.closeFuture.whenComplete { _ in tracker.remove(channel) }
                    } else {
                        channel.close(promise: nil)
                    }
                    return AcceptedConnection(channel: wrapped, handOff: handOff)
                }
            }
    }

    public func run() async throws {
        let config = self.config
        let metrics = self.metrics
        var opened: [(NIOAsyncChannel<AcceptedConnection, Never>, Bool)] = []
        for (port, tls) in listeners {
            let listener: NIOAsyncChannel<AcceptedConnection, Never>
            do {
                listener = try await bind(port: port, tls: tls)
            } catch {
                for (open, _) in opened { try? await open.channel.close() }
                // Whoever waits for the ports learns there are none.
                self.bound.continuation.finish()
                throw error
            }
            let actual = listener.channel.localAddress?.port ?? port
            logger.info("listening", metadata: ["address": "\(config.api.hostname):\(actual)",
                                                "tls": "\(tls != nil)"])
            opened.append((listener, tls != nil))
        }
        let bound = opened
        self.bound.continuation.yield(bound.map { $0.0.channel.localAddress?.port ?? 0 })
        // Written while serving, not only at the end: a crash (kill -9, OOM,
        // power) loses at most one interval of answers.
        let remembering = Task { [self] in
            while true {
                do { try await Task.sleep(for: Self.memoryInterval) } catch { return }
                await saveMemory()
            }
        }
        defer { remembering.cancel() }  // also when serving ends in an error
        // Freed memory goes back to the kernel between bursts, so the
        // resident size follows what is in use (FreedMemory says why); a
        // fill's write buffers go back at once.
        FreedMemory.mapAllocations(from: BlobSink.batchSize)
        let trimming = Task {
            let freed = FreedMemory()
            while true {
                do { try await Task.sleep(for: FreedMemory.interval) } catch { return }
                // On a thread of NIO's blocking pool: a trim walks each
                // arena under its lock, which the cooperative pool's two
                // threads should not wait on.
                _ = try? await NIOThreadPool.singleton.runIfActive { freed.returnIfGrown() }
            }
        }
        defer { trimming.cancel() }
        let fileIO = self.fileIO

        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                for (listener, tls) in bound {
                    group.addTask {
                        try await withThrowingDiscardingTaskGroup { connectionTasks in
                            try await listener.executeThenClose { connections in
                                for try await connection in connections {
                                    metrics.connectedClients.increment()
                                    connectionTasks.addTask {
                                        await ClientConnection(channel: connection.channel,
                                                               handOff: connection.handOff, handler: self.handler,
                                                               tracker: self.tracker,
                                                               fileIO: fileIO, tls: tls).serve()
                                        metrics.connectedClients.decrement()
                                    }
                                }
                            }
                        }
                    }
                }
            }
        } onGracefulShutdown: {
            self.logger.info("shutting down: no new connections, finishing in-flight work")
            let deadline = ContinuousClock.now + .milliseconds(Int64(config.timeouts.shutdownSeconds * 1000))
            self.shutdownDeadline.withLockedValue { $0 = deadline }
            self.tracker.drain()  // also turns /readyz to 503
            for (listener, _) in bound { listener.channel.close(promise: nil) }
            self.scheduleCut(at: deadline)
        }
        await finishFills()
        // The last save after the periodic one has stopped: never two at once.
        remembering.cancel()
        await remembering.value
        await saveMemory()
        LogWriter.requestLines.flush()
        // Every fill has ended and deleted its own file; anything left is
        // debris (a delete that failed) and must not outlive the process.
        store.removeTemporaryFiles()
        try? await client.shutdown()
        await store.stopEvictions()
        store.writer.shutdown()
        store.releaseFolder()
        logger.info("stopped")
    }

    /// One deadline for everything: responses and fills still running when
    /// it passes are cut (their temporary files go), and upstream requests
    /// still waiting (a pass-through to a silent upstream) are cancelled
    /// with the client, so that their connections' tasks end too.
    private func scheduleCut(at deadline: ContinuousClock.Instant) {
        let (tracker, fills, client, logger) = (self.tracker, self.fills, self.client, self.logger)
        Task {
            try? await Task.sleep(until: deadline)
            if fills.isBusy { logger.warning("shutdown timeout: abandoning unfinished fills") }
            tracker.closeAll()
            fills.cancelAll()
            try? await client.shutdown()
        }
    }

    /// Lets running fills complete (so their blobs are kept) until the
    /// shutdown deadline cuts the rest.
    private func finishFills() async {
        if shutdownDeadline.withLockedValue({ $0 }) == nil {
            // Ended without a graceful shutdown (the listener failed): the
            // same bound applies from now.
            scheduleCut(at: .now + .milliseconds(Int64(config.timeouts.shutdownSeconds * 1000)))
        }
        await fills.drain()
    }

    /// Writes the access tables to the storage folder when they changed (on
    /// the thread pool: a write, two fsyncs and a rename). A failure is
    /// logged and the next interval tries again.
    private func saveMemory() async {
        guard remembers else { return }
        let (changedAccess, changedTags, changedPings) = (gate.snapshotIfChanged(), tags.snapshot(), pings.snapshot())
        guard changedAccess != nil || changedTags != nil || changedPings != nil,
              var snapshot = changedAccess ?? gate.snapshotIfChanged(always: true) else { return }
        snapshot.tags = changedTags ?? tags.snapshot(always: true) ?? []
        snapshot.pings = changedPings ?? pings.snapshot(always: true) ?? []
        let (folder, upstreams, saved) = (config.storage.folder, live.config.upstreams, snapshot)
        do {
            // The future-based call: the async one skips its work when the
            // calling task is cancelled, and the last save must run.
            try await threadPool.runIfActive(eventLoop: group.next()) {
                try AccessMemory.save(saved, storage: folder, upstreams: upstreams)
            }.get()
        } catch {
            gate.markChanged()
            tags.markChanged()
            pings.markChanged()
            logger.warning("offline memory not saved", metadata: ["error": "\(error)"])
        }
    }

    /// For an exit that cannot wait (a second signal): deletes the temporary
    /// files of fills still running. Published blobs are complete by
    /// construction, so nothing else needs doing.
    public func removeUnfinishedFiles() {
        store.removeTemporaryFiles()
    }
}
