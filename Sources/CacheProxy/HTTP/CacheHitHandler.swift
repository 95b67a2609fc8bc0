import NIOCore
#if canImport(Glibc)
import Glibc
#endif
import NIOHTTP1
import ProxyMetrics

/// Answers cache hits on the event loop, without a hop to a task.
///
/// A hit is the hot path: the blob is complete on disk, so there is nothing to
/// wait for, and handing it to the async request loop would cost two thread
/// hops per request for no gain. Anything that is not a plain hit (misses,
/// pass-through, errors, local endpoints) goes on to the async side
/// unchanged, which checks the store again (a fill may have published in
/// between), so declining is always safe. Called by `RequestFrontHandler`.
struct CacheHitResponder: Sendable {
    let live: LiveConfig
    let store: BlobStore
    let gate: AccessGate
    let metrics: ProxyMetrics
    let tracker: ConnectionTracker
    let requestLog: RequestLog
    /// Tags resolved on the event loop (`TagLookup`).
    let tags: TagTable
    let upstreams: LoopUpstreamPool
    var smallBlobs: SmallBlobCache { store.smallBlobs }

    /// Writes the whole response and returns true when the request is a hit
    /// that needs no disk.
    func answer(_ head: HTTPRequestHead, router: Router, context: ChannelHandlerContext, client: String?,
                credentials: AccessGate.CredentialMemo? = nil,
                wrap: (HTTPServerResponsePart) -> NIOAny) -> Bool {
        guard head.method == .GET || head.method == .HEAD,
              // A client that does not read its answers gets the next one
              // from the async side, which waits for the channel to drain.
              context.channel.isWritable,
              let (name, digest, kind, upstream) = content(head.method.rawValue, head.uri,
                                                           host: head.headers.first(name: "host"), router: router),
              // A manifest's HEAD needs its media type, from the file; its
              // ranges (rare) take the async side's plan.
              kind == .blob || (head.method == .GET && !head.headers.contains(name: "range")),
              let size = store.size(of: digest),
              // Only what needs no disk is answered here: a HEAD (the index
              // knows the size) and a blob held in memory. Opening, reading
              // or sending a file can wait for the disk, and on the event
              // loop that wait would stall every connection of the loop:
              // files go to the async side, which opens them off the loop
              // and reads what the page cache lacks on the thread pool.
              case let entry = head.method == .HEAD ? nil : smallBlobs.get(digest, kind: kind),
              head.method == .HEAD || entry != nil,
              // A client whose access is not known to be fresh is checked
              // on the async side (an upstream HEAD).
              gate.allowsNow(upstream: upstream, headers: head.headers, repository: name, digest: digest,
                             kind: kind, memo: credentials)
        else { return false }
        // Busy until the last byte is written, so a draining server lets a
        // large hit finish instead of closing it as an idle connection; once
        // draining, the answer carries `Connection: close`.
        let notDraining = tracker.setIdle(context.channel, false)
        // One last-use stamp per hit from memory. A HEAD is not a use.
        if entry != nil { _ = store.use(digest) }
        send(head, digest: digest, kind: kind, entry: entry, size: size, upstream: upstream,
             keepAlive: head.isKeepAlive && notDraining, context: context, client: client, wrap: wrap)
        return true
    }

    /// Writes a hit's answer: the whole content or the range asked for from
    /// `entry`, or (a `HEAD`, `entry` nil) the head alone. The connection is
    /// marked busy by the caller; `finished` marks it idle.
    func send(_ head: HTTPRequestHead, digest: Digest, kind: ContentKind, entry: SmallBlobCache.Entry?, size: Int64,
              upstream: ProxyConfig.Upstream, keepAlive: Bool, context: ChannelHandlerContext, client: String?,
              started: ContinuousClock.Instant = .now, wrap: (HTTPServerResponsePart) -> NIOAny) {
        let channel = context.channel
        let inline = entry?.bytes
        let rangeHeader = head.headers.first(name: "range")
        let plan: BlobResponsePlan
        if let entry, rangeHeader == nil {
            plan = BlobResponsePlan(whole: entry.bytes.readableBytes, headers: entry.headers)
        } else if let entry {
            plan = BlobResponsePlan(digest: digest, length: Int64(entry.bytes.readableBytes), contentType: nil,
                                    rangeHeader: rangeHeader)
        } else {
            plan = BlobResponsePlan(digest: digest, length: size, contentType: nil, rangeHeader: nil)
        }
        var headers = plan.headers
        if !keepAlive { headers.replaceOrAdd(name: "connection", value: "close") }
        context.write(wrap(.head(HTTPResponseHead(version: head.version, status: plan.status, headers: headers))),
                      promise: nil)
        var sent: Int64 = 0
        if head.method != .HEAD, let bytes = inline, let range = plan.range {
            // Small blobs go out with the head in one writev: for a few KiB a
            // copy is cheaper than a second syscall and a second packet.
            if let slice = bytes.getSlice(at: bytes.readerIndex + Int(range.lowerBound), length: range.count) {
                context.write(wrap(.body(.byteBuffer(slice))), promise: nil)
            }
            sent = Int64(range.count)
        }
        let written = context.writeAndFlush(wrap(.end(nil)))
        let hit = Hit(kind: kind, method: head.method.rawValue, uri: head.uri, host: head.headers.first(name: "host"),
                      upstream: upstream.host, client: client, status: Int(plan.status.code), sent: sent,
                      started: started, keepAlive: keepAlive)
        written.assumeIsolated().whenComplete { finished(hit, result: $0, channel: channel) }
    }

    /// The fast path's answer (`HitFrontHandler`): a keep-alive HTTP/1.1
    /// `GET` of a whole blob (or manifest by digest) held in memory, written as bytes ahead of NIO's
    /// encoder. The same lookups (`content`) and the same access check as `answer`, in
    /// the same order; false, having written nothing, for anything else.
    func answerAhead(_ request: PlainGetHead, router: Router, context: ChannelHandlerContext, client: String?,
                     credentials: AccessGate.CredentialMemo, timeouts: ConnectionTimeoutsHandler) -> Bool {
        guard let (name, digest, kind, upstream) = content("GET", request.target, host: request.host, router: router),
              let entry = smallBlobs.get(digest, kind: kind),
              gate.allowsNow(upstream: upstream,
                             headers: request.authorization.map { ["authorization": $0] } ?? [:],
                             repository: name, digest: digest, kind: kind, memo: credentials),
              // Still in the index (and marked used); an evicted blob is the
              // async side's to fetch again.
              store.use(digest) != nil
        else { return false }
        let channel = context.channel
        // Busy until written, as in `answer`; a draining server's answers
        // carry `Connection: close`, which the usual path writes.
        guard tracker.setIdle(channel, false) else {
            tracker.setIdle(channel, true)
            return false
        }
        timeouts.takenAhead()
        writeAhead(entry, kind: kind, request: request, upstream: upstream, client: client, started: .now,
                   context: context, timeouts: timeouts)
        return true
    }

    /// Writes `entry` whole from the front of the pipeline, its prebuilt
    /// head and its bytes, for a `GET` `HitFrontHandler` took
    /// (`ConnectionTimeoutsHandler.takenAhead`): watched by the send
    /// timeout, then counted and logged as a hit. One place for a blob or
    /// manifest by digest and a manifest a tag named.
    func writeAhead(_ entry: SmallBlobCache.Entry, kind: ContentKind, request: PlainGetHead,
                    upstream: ProxyConfig.Upstream, client: String?, started: ContinuousClock.Instant,
                    context: ChannelHandlerContext, timeouts: ConnectionTimeoutsHandler) {
        let channel = context.channel
        context.write(NIOAny(entry.responseHead), promise: nil)
        let written = context.writeAndFlush(NIOAny(entry.bytes))
        timeouts.answeringAhead(bytes: entry.bytes.readableBytes)
        let hit = Hit(kind: kind, method: "GET", uri: request.target, host: request.host, upstream: upstream.host,
                      client: client, status: 200, sent: Int64(entry.bytes.readableBytes), started: started,
                      keepAlive: true)
        written.assumeIsolated().whenComplete { result in
            timeouts.answeredAhead()
            finished(hit, result: result, channel: channel)
        }
        timeouts.flushedAhead(channel: channel)
    }

    /// A blob, or a manifest by digest of an upstream that caches manifests:
    /// content the cache holds under its digest (a tag is the upstream's to
    /// resolve), and the upstream the request is routed to. One place for
    /// both hit paths; memory, index and access checks are theirs.
    private func content(_ method: String, _ uri: String, host: String?, router: Router)
        -> (name: String, digest: Digest, kind: ContentKind, upstream: ProxyConfig.Upstream)? {
        // A digest is `algorithm:hex`, and nothing else in a path to content
        // has a colon (a tag cannot): a pull by tag, which both hit paths
        // see first, is turned away without the classification.
        guard uri.containsByte(UInt8(ascii: ":")) else { return nil }
        let name: String, digest: Digest, kind: ContentKind
        switch try? RequestTarget.classify(method: method, uri: uri) {
        case .blob(let blobName, let blobDigest)?: (name, digest, kind) = (blobName, blobDigest, .blob)
        case .manifest(let manifestName, .digest(let manifestDigest))?:
            (name, digest, kind) = (manifestName, manifestDigest, .manifest)
        default: return nil
        }
        guard let upstream = router.route(host: host, namespace: RequestURI.queryValue("ns", in: uri)),
              kind == .blob || upstream.manifests == .revalidate else { return nil }
        return (name, digest, kind, upstream)
    }

    /// What a hit's metrics and request line say of it.
    struct Hit {
        let kind: ContentKind
        let method: String
        let uri: String
        let host: String?
        let upstream: String
        let client: String?
        let status: Int
        let sent: Int64
        let started: ContinuousClock.Instant
        let keepAlive: Bool
        /// What the request log calls it: a tag's `HEAD` answered with the
        /// upstream's own headers is a pass-through, not a hit.
        var answer: RequestLog.Answer = .hit
    }

    /// A hit's last byte was written (or its client left): counted, logged,
    /// and its connection idle again (closed when draining or not kept alive).
    func finished(_ hit: Hit, result: Result<Void, any Error>, channel: any Channel) {
        let sent: Int64
        if case .success = result {
            sent = hit.sent
            if hit.answer == .hit {
                (hit.kind == .blob ? metrics.blobHits : metrics.manifestHits).increment()
                metrics.bytesFromCache.increment(by: sent)
            }
        } else {
            sent = 0
        }
        let seconds = hit.started.duration(to: .now).inSeconds
        metrics.requestFinished(kind: hit.kind == .blob ? "blob" : "manifest", method: hit.method, code: hit.status,
                                seconds: seconds)
        if requestLog.enabled {
            requestLog.record(.init(client: hit.client, method: hit.method, uri: hit.uri, host: hit.host,
                                    upstream: hit.upstream, status: hit.status, bytes: sent, seconds: seconds,
                                    answer: hit.answer))
        }
        if !tracker.setIdle(channel, true) || !hit.keepAlive { channel.close(promise: nil) }
    }
}
