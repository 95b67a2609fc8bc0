import NIOCore
import NIOHTTP1
import ProxyMetrics

/// The handlers of one client connection, head to tail:
///
/// ```
/// (NIOSSLServerHandler)   on a TLS listener
/// HitFrontHandler         plain GETs of blobs and manifests held in memory, answered
///                         from the raw bytes when nothing else is owed; GETs of
///                         manifests by tag, asked of the upstream from there
/// RequestHeadLimiter      431 above the head-size limit (sees raw bytes)
/// HTTPResponseEncoder
/// HTTPRequestDecoder      (its own header limits as a second line)
/// ConnectionTimeoutsHandler   head / idle / request-body deadlines, send timeout,
///                             400 on what the decoder cannot parse
/// HTTPServerPipelineHandler   pipelined requests answered in order
/// RequestFrontHandler     head checks (CONNECT, target forms, Host, framing), then hits,
///                         then tags resolved on the loop (`TagLookup`)
/// (NIOAsyncChannel)       everything else, in `ClientConnection`
/// ```
///
/// Each handler costs a hop on every event of every request, so concerns
/// that see the same events share one (measured on the 4 KiB hit path:
/// about 3-5% of the throughput per handler).
enum ClientPipeline {
    static func configure(_ channel: any Channel, config: ProxyConfig, hits: CacheHitResponder,
                          metrics: ProxyMetrics, handOff: TagHandOff) throws {
        let t = config.timeouts
        let timeouts = ConnectionTimeoutsHandler(
            limits: .init(head: .fromSeconds(t.headerReadSeconds), idle: .fromSeconds(t.idleSeconds),
                          requestBody: .fromSeconds(t.requestBodySeconds)),
            send: .fromSeconds(t.sendSeconds),
            onTimeout: { kind in metrics.clientTimeouts[kind]?.increment() })
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = config.maxHeaderBytes
        limits.maxHeaderFieldSize = config.maxHeaderBytes
        let sync = channel.pipeline.syncOperations
        let credentials = AccessGate.CredentialMemo()
        let askedAhead = TagAskedAhead()
        try sync.addHandler(HitFrontHandler(hits: hits, timeouts: timeouts, limit: config.maxHeaderBytes,
                                            credentials: credentials, askedAhead: askedAhead))
        try sync.addHandler(RequestHeadLimiter(timeouts: timeouts, limit: config.maxHeaderBytes))
        // The encoder and decoder come from NIO's own set-up, not built by
        // hand: only then does the decoder tell the encoder each request's
        // method, so an answer to a `HEAD` never carries a body, whatever
        // its framing headers say. (An upstream's `HEAD` answer framed
        // `Transfer-Encoding: chunked` otherwise got a `0\r\n\r\n` the
        // client read as the start of its next answer.)
        // Outbound header validation is off: every header value the proxy
        // sends is its own or was parsed from an upstream response by a
        // validating parser, and on the 4 KiB hit path the check cost several
        // percent. Pipelining and protocol errors are handled below, after
        // the timeouts handler.
        try sync.configureHTTPServerPipeline(
            position: .last, withPipeliningAssistance: false, withServerUpgrade: nil, withErrorHandling: false,
            withOutboundHeaderValidation: false, withEncoderConfiguration: .init(),
            withDecoderLimitConfiguration: limits)
        try sync.addHandler(timeouts)
        try sync.addHandler(HTTPServerPipelineHandler())
        try sync.addHandler(RequestFrontHandler(hits: hits, credentials: credentials, handOff: handOff,
                                                askedAhead: askedAhead))
    }
}

extension TimeAmount {
    static func fromSeconds(_ seconds: Double) -> TimeAmount {
        .nanoseconds(Int64(seconds * 1_000_000_000))
    }
}
