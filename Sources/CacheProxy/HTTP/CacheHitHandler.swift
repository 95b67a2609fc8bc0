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

    /// Writes the whole response and returns true when the request is a hit.
    ///
    /// On a TLS connection (`tls`) bytes cannot go by sendfile: only blobs
    /// small enough to be sent from memory are answered here, larger ones
    /// are read in large chunks on the async side.
    func answer(_ head: HTTPRequestHead, router: Router, context: ChannelHandlerContext, tls: Bool = false,
                credentials: AccessGate.CredentialMemo? = nil,
                wrap: (HTTPServerResponsePart) -> NIOAny) -> Bool {
        guard head.method == .GET || head.method == .HEAD,
              case .blob(let name, let digest)? = try? RequestTarget.classify(method: head.method.rawValue, uri: head.uri),
              let size = store.size(of: digest),
              let upstream = router.route(host: head.headers.first(name: "host"),
                                          namespace: RequestURI.queryValue("ns", in: head.uri)),
              // A client whose access is not known to be fresh is checked
              // on the async side (an upstream HEAD).
              !tls || head.method == .HEAD || size <= smallBlobs.maxBlobSize,
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

        let plan: BlobResponsePlan
        var file: NIOFileHandle?
        let entry = head.method == .HEAD ? nil : smallBlobs.get(digest)
        // One last-use stamp per hit: here for a blob from memory, in
        // `openCached` for a file. A HEAD is not a use.
        if entry != nil { _ = store.use(digest) }
        var inline = entry?.bytes
        let rangeHeader = head.headers.first(name: "range")
        if head.method == .HEAD {
            plan = BlobResponsePlan(digest: digest, length: size, contentType: nil, rangeHeader: nil)
        } else if let entry, rangeHeader == nil {
            plan = BlobResponsePlan(whole: entry.bytes.readableBytes, headers: entry.headers)
        } else if let entry {
            plan = BlobResponsePlan(digest: digest, length: Int64(entry.bytes.readableBytes), contentType: nil,
                                    rangeHeader: rangeHeader)
        } else {
            // Anything but an open file (a miss, fd pressure) is the async
            // path's to answer.
            guard case .file(let fd, let actualSize) = store.openCached(digest) else { return false }
            file = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
            plan = BlobResponsePlan(digest: digest, length: actualSize, contentType: nil, rangeHeader: rangeHeader)
            if actualSize <= smallBlobs.maxBlobSize, let file,
               let bytes = Self.read(file, range: 0..<actualSize, allocator: context.channel.allocator) {
                // Kept in memory only once its bytes are the digest's: a
                // file damaged on disk since it was published (a power loss
                // with `fsync: false`) would otherwise be served from
                // memory for the rest of the process's life, whatever
                // `cache-proxy verify` removes. Hashing 64 KiB once is cheap.
                guard digest.matches(bytes) else {
                    try? file.close()
                    store.release(digest)
                    store.discardDamaged(digest)
                    metrics.digestMismatches.increment()
                    return false  // the async path fetches it again
                }
                smallBlobs.put(digest, bytes)
                inline = bytes
            }
        }
        if tls, inline == nil, head.method != .HEAD {
            // No sendfile through TLS: the async side reads it in chunks.
            if let file {
                try? file.close()
                store.release(digest)
            }
            return false
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
        } else if let file, let range = plan.range {
            var offset = range.lowerBound
            while offset < range.upperBound {
                let end = min(range.upperBound, offset + ResponseChannel.maxRegion)
                let region = FileRegion(fileHandle: file, readerIndex: Int(offset), endIndex: Int(end))
                context.write(wrap(.body(.fileRegion(region))), promise: nil)
                offset = end
            }
            sent = Int64(range.count)
        }
        let metrics = self.metrics
        let status = plan.status
        let method = head.method.rawValue
        let store = self.store
        let requestLog = self.requestLog
        context.writeAndFlush(wrap(.end(nil))).assumeIsolated().whenComplete { result in
            if let file {
                try? file.close()
                store.release(digest)
            }
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

    /// Reads a small range of a cached file; `nil` (fall back to sendfile)
    /// if the file came up short.
    static func read(_ file: NIOFileHandle, range: Range<Int64>, allocator: ByteBufferAllocator) -> ByteBuffer? {
        var buffer = allocator.buffer(capacity: Int(range.count))
        let count = Int(range.count)
        let read = try? file.withUnsafeFileDescriptor { fd in
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { pointer in
                max(0, pread(fd, pointer.baseAddress, count, off_t(range.lowerBound)))
            }
        }
        return read == count ? buffer : nil
    }
}
