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
    var smallBlobs: SmallBlobCache { store.smallBlobs }

    /// Writes the whole response and returns true when the request is a hit
    /// that needs no disk.
    func answer(_ head: HTTPRequestHead, router: Router, context: ChannelHandlerContext,
                credentials: AccessGate.CredentialMemo? = nil,
                wrap: (HTTPServerResponsePart) -> NIOAny) -> Bool {
        guard head.method == .GET || head.method == .HEAD,
              case .blob(let name, let digest)? = try? RequestTarget.classify(method: head.method.rawValue, uri: head.uri),
              let size = store.size(of: digest),
              let upstream = router.route(host: head.headers.first(name: "host"),
                                          namespace: RequestURI.queryValue("ns", in: head.uri)),
              // Only what needs no disk is answered here: a HEAD (the index
              // knows the size) and a blob held in memory. Opening, reading
              // or sending a file can wait for the disk, and on the event
              // loop that wait would stall every connection of the loop:
              // files go to the async side, which opens them off the loop
              // and reads what the page cache lacks on the thread pool.
              case let entry = head.method == .HEAD ? nil : smallBlobs.get(digest),
              head.method == .HEAD || entry != nil,
              // A client whose access is not known to be fresh is checked
              // on the async side (an upstream HEAD).
              gate.allowsNow(upstream: upstream, headers: head.headers, repository: name, digest: digest,
                             memo: credentials)
        else { return false }
        let started = ContinuousClock.now
        let channel = context.channel
        let tracker = self.tracker
        // Busy until the last byte is written, so a draining server lets a
        // large hit finish instead of closing it as an idle connection; once
        // draining, the answer carries `Connection: close`.
        let keepAlive = head.isKeepAlive && tracker.setIdle(channel, false)

        // One last-use stamp per hit from memory. A HEAD is not a use.
        if entry != nil { _ = store.use(digest) }
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
        let metrics = self.metrics
        let status = plan.status
        let method = head.method.rawValue
        let requestLog = self.requestLog
        context.writeAndFlush(wrap(.end(nil))).assumeIsolated().whenComplete { result in
            if case .success = result {
                metrics.blobHits.increment()
                metrics.bytesFromCache.increment(by: sent)
            }
            let seconds = started.duration(to: .now).inSeconds
            metrics.requestFinished(kind: "blob", method: method, code: Int(status.code), seconds: seconds)
            if requestLog.enabled {
                var bytes: Int64 = 0
                if case .success = result { bytes = sent }
                requestLog.record(.init(client: channel.remoteAddress?.ipAddress, method: method, uri: head.uri,
                                        host: head.headers.first(name: "host"), upstream: upstream.host,
                                        status: Int(status.code), bytes: bytes, seconds: seconds, answer: .hit))
            }
            if !tracker.setIdle(channel, true) || !keepAlive { channel.close(promise: nil) }
        }
        return true
    }
}
