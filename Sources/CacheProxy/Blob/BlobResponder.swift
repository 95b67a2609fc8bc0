import NIOCore
import NIOHTTP1
import Prometheus
import ProxyMetrics
#if canImport(Glibc)
import Glibc
#endif

/// Answers `GET`/`HEAD /v2/<name>/blobs/<digest>`: from the cache when the
/// blob is there, otherwise by following the (one) fill for the digest.
/// Every byte a client gets comes from a file with `sendfile`, except when
/// the disk failed during a fill: then from the fill's memory window.
struct BlobResponder: Sendable {
    let store: BlobStore
    let fills: FillRegistry
    let passThrough: PassThrough
    let gate: AccessGate
    let metrics: ProxyMetrics

    struct Request: Sendable {
        let head: HTTPRequestHead
        let name: String
        let digest: Digest
        let upstream: ProxyConfig.Upstream
        let origin: PassThrough.Origin
        var kind: ContentKind = .blob
        /// The upstream said yes to this client for this digest just now
        /// (a tag's `HEAD` named it), or before when it cannot be asked:
        /// no access check is needed.
        var admitted = false
    }

    func respond(_ request: Request, response: ResponseChannel) async throws -> HTTPResponseStatus {
        if request.head.method == .HEAD {
            return try await respondToHead(request, response: response)
        }
        // A blob GET is never passed through: every byte a client gets has
        // gone through a fill that checks the digest.
        var attempt = 0
        var admitted = request.admitted
        /// Set once a joined fill was refused for another client's
        /// credentials: from then on this client starts its own.
        var refusedForOthers = false
        while true {
            attempt += 1
            // Bytes someone else fetched go only to a client the upstream
            // would give them to; a client that starts its own fill is
            // checked by the upstream's answer to that fill.
            if !admitted, store.size(of: request.digest) != nil {
                admitted = true
                if let refusal = try await admit(request, response: response) { return refusal }
            }
            // Held in memory (a small blob or manifest read before): no
            // file to open, nothing to read.
            if admitted, let entry = store.smallBlobs.get(request.digest, kind: request.kind),
               store.use(request.digest) != nil {
                hits(request.kind).increment()
                response.answered(.hit)
                return try await sendFromMemory(entry.bytes, contentType: entry.headers.first(name: "content-type"),
                                                request, response: response, source: metrics.bytesFromCache)
            }
            switch store.openCached(request.digest) {
            case .file(let fd, let size):
                if !admitted {
                    // Published between the look at the index and the open:
                    // checked now, with the file held.
                    admitted = true
                    let refusal: HTTPResponseStatus?
                    do {
                        refusal = try await admit(request, response: response)
                    } catch {
                        close(fd)
                        store.release(request.digest)
                        throw error
                    }
                    if let refusal {
                        close(fd)
                        store.release(request.digest)
                        return refusal
                    }
                }
                hits(request.kind).increment()
                response.answered(.hit)
                if let status = try await serveComplete(fd: fd, size: size, request, response: response,
                                                        source: metrics.bytesFromCache) {
                    return status
                }
                // Damaged on disk and dropped: fetched again, a bounded number of times.
                guard attempt <= 3 else { return try await sendOverloaded(response) }
                continue
            case .unavailable:
                return try await sendOverloaded(response)
            case .missing:
                break
            }
            guard attempt <= 3 else { return try await sendOverloaded(response) }
            let lookup = fills.fill(for: request.digest, kind: request.kind, upstream: request.upstream,
                                    repository: request.name,
                                    headers: Self.upstreamHeaders(request.head.headers, kind: request.kind),
                                    ownUnlessAnswered: refusedForOthers)
            guard case .fill(let fill, let joined) = lookup else { continue }  // published meanwhile
            if joined, !admitted {
                admitted = true
                if let refusal = try await admit(request, response: response) { return refusal }
            }
            let status = try await fill.withFollower(closing: response.closeWatch) { follower -> HTTPResponseStatus? in
                let first = await fill.next(after: -1, follower: follower)
                try response.checkClientPresent()
                if fill.wasWithdrawn {
                    // Its last client left just as this one came: ask again.
                    return nil
                }
                switch first.state {
                case .rejected where joined && [401, 403, 404].contains(first.answer?.status.code ?? 0):
                    // The upstream refused someone else's credentials: ask
                    // again, as the leader of a fill with this client's own
                    // (never hand it another client's refusal; the attempt
                    // bound above ends the loop). Other answers (429, 5xx)
                    // say nothing of credentials and are passed on.
                    refusedForOthers = true
                    return nil
                case .rejected, .failed:
                    count(first.state, joined: joined, kind: request.kind, response: response)
                    if let answer = first.answer {
                        var headers = PassThrough.endToEnd(answer.headers)
                        headers.remove(name: "content-length")
                        try await response.send(answer.status, headers: headers, body: answer.body)
                        return answer.status
                    }
                    let error = OCIError(.badGateway, .unavailable, "the upstream blob download failed")
                    try await response.send(error)
                    return error.status
                default:
                    count(first.state, joined: joined, kind: request.kind, response: response)
                    // The upstream's yes to this client, if it was one, is
                    // remembered by the fill once the digest verified.
                    return try await follow(fill, follower: follower, first: first, request, response: response)
                }
            }
            if let status { return status }
        }
    }

    /// A HEAD is answered from the index, else from a fill in flight for the
    /// digest (until the fill is published it answers for its digest, so a
    /// HEAD right after a GET never goes upstream again), else by the
    /// upstream, storing nothing.
    private func respondToHead(_ request: Request, response: ResponseChannel) async throws -> HTTPResponseStatus {
        // Anything the proxy knows itself about the blob (that it is cached,
        // its size) goes only to a client the upstream would tell; a blob
        // published after this look is the upstream's to answer for.
        let running = fills.running(request.digest, upstream: request.upstream, kind: request.kind)
        guard store.size(of: request.digest) != nil || running != nil else {
            response.answered(.passthrough)
            return try await passThrough.forward(request.head, to: request.upstream, body: nil,
                                                 origin: request.origin, response: response)
        }
        if request.admitted {
            // Allowed already (a tag's answer).
        } else if let running, running.vouched, asksAsStarter(of: running, request) {
            // The fill's own answer was the upstream's yes to this client,
            // just now: what a HEAD of the check would have asked.
        } else if let refusal = try await admit(request, response: response) {
            return refusal
        }
        if let size = store.size(of: request.digest) {
            hits(request.kind).increment()
            response.answered(.hit)
            let contentType = request.kind == .manifest ? store.mediaType(of: request.digest)?.value : nil
            return try await sendHead(request, length: size, contentType: contentType, response: response)
        }
        // A fill still queued for a download slot knows nothing yet, and a
        // HEAD must not wait in that queue: the upstream is asked at once.
        if let fill = running, !fill.isWaitingForSlot {
            // The fill's answer: its length as soon as the upstream said 200
            // with one (the upstream's own claim, as a HEAD to the upstream
            // would give; a HEAD carries no bytes to verify), or the verified
            // size once known. A chunked fill has no length to tell before
            // its end, and a HEAD must not wait a whole download for it: the
            // upstream is asked instead, as when the fill was refused.
            let snapshot = await fill.withFollower(closing: response.closeWatch) { follower in
                await fill.next(after: -1, follower: follower)
            }
            try response.checkClientPresent()
            let length: Int64?
            switch snapshot.state {
            case .verified(let size), .published(let size), .delivered(let size): length = size
            case .streaming, .verifying: length = snapshot.head?.contentLength
            default: length = nil
            }
            if let length {
                count(snapshot.state, joined: true, kind: request.kind, response: response)
                return try await sendHead(request, length: length, contentType: snapshot.head?.contentType,
                                          response: response)
            }
        }
        response.answered(.passthrough)
        return try await passThrough.forward(request.head, to: request.upstream, body: nil,
                                             origin: request.origin, response: response)
    }

    /// Whether `request` comes with the credentials and repository of the
    /// client that started `fill`.
    private func asksAsStarter(of fill: Fill, _ request: Request) -> Bool {
        fill.repository == request.name
            && gate.grant(upstream: request.upstream, headers: request.head.headers, repository: request.name)
                == gate.grant(upstream: request.upstream, headers: fill.requestHeaders, repository: fill.repository)
    }

    /// Counts a read that follows a fill by what it got: a fill that had
    /// already verified its bytes gives none from the upstream to this
    /// read, which is then a hit (users read `blob_hits_total` as "answered
    /// without the upstream"); otherwise a join, or the miss that started it.
    private func count(_ state: FillStateMachine.State, joined: Bool, kind: ContentKind, response: ResponseChannel) {
        let misses = kind == .blob ? metrics.blobMisses : metrics.manifestMisses
        switch state {
        case .verified, .published, .delivered:
            // The starter fetched it, however fast the fill was done.
            (joined ? hits(kind) : misses).increment()
            response.answered(joined ? .hit : .miss)
        default:
            (joined ? metrics.coalescedFollowers : misses).increment()
            response.answered(joined ? .joined : .miss)
        }
    }

    private func hits(_ kind: ContentKind) -> Counter {
        kind == .blob ? metrics.blobHits : metrics.manifestHits
    }

    /// Answers the client when the upstream would not give it this blob;
    /// nil when it may have it.
    private func admit(_ request: Request, response: ResponseChannel) async throws -> HTTPResponseStatus? {
        let verdict = await gate.check(upstream: request.upstream, headers: request.head.headers,
                                       repository: request.name, digest: request.digest, kind: request.kind)
        try response.checkClientPresent()
        let omitBody = request.head.method == .HEAD
        switch verdict {
        case .allowed:
            return nil
        case .allowedOffline:
            if request.kind == .manifest { metrics.manifestsOffline.increment() }
            response.answered(.offline)
            return nil
        case .refused(let status, let upstreamHeaders):
            response.answered(.passthrough)
            try await Self.sendUpstreamAnswer(status, upstreamHeaders, kind: request.kind, omitBody: omitBody,
                                              response: response)
            return status
        case .unreachable(let error):
            response.answered(.error)
            try await response.send(error, omitBody: omitBody)
            return error.status
        }
    }

    /// Passes on the upstream's answer to a `HEAD` (a refusal, a 429, a
    /// 5xx): its status and headers (its `WWW-Authenticate` above all,
    /// its `Retry-After`), with a JSON body of this proxy's, since the
    /// upstream's answer had none, and without what described that absent
    /// body.
    static func sendUpstreamAnswer(_ status: HTTPResponseStatus, _ upstreamHeaders: HTTPHeaders, kind: ContentKind,
                                   omitBody: Bool, response: ResponseChannel) async throws {
        var headers = PassThrough.endToEnd(upstreamHeaders)
        for name in ["content-length", "content-type", "docker-content-digest", "etag", "accept-ranges"] {
            headers.remove(name: name)
        }
        headers.add(name: "content-type", value: "application/json")
        let error = status.code >= 500 || status.code == 429
            ? OCIError(status, .unavailable, "the upstream registry answered \(status.code)")
            : OCIError.refusal(status, kind: kind)
        try await response.send(status, headers: headers, body: ByteBuffer(string: error.body), omitBody: omitBody)
    }

    private func sendHead(_ request: Request, length: Int64, contentType: String?,
                          response: ResponseChannel) async throws -> HTTPResponseStatus {
        response.head(.ok, BlobResponsePlan.headers(for: request.digest, length: length, contentType: contentType))
        try await response.end()
        return .ok
    }

    /// The blob is cached but cannot be opened now (out of descriptors):
    /// a retryable 503, never a refetch and never a forgotten blob.
    private func sendOverloaded(_ response: ResponseChannel) async throws -> HTTPResponseStatus {
        response.answered(.error)
        let error = OCIError(.serviceUnavailable, .unavailable, "the cache is overloaded; retry shortly")
        try await response.send(error.status, headers: ["content-type": "application/json", "retry-after": "1"],
                                body: ByteBuffer(string: error.body))
        return error.status
    }

    /// Serves a complete file (a hit, or a fill that finished before this
    /// follower could pick up its descriptor). Takes ownership of `fd`.
    ///
    /// A blob small enough for memory is read whole on the thread pool,
    /// checked against its digest and kept in `SmallBlobCache`, whence the
    /// event loop answers it from then on. Nil: the file did not match its
    /// digest (damaged on disk since it was published, a power loss with
    /// `fsync: false`); it was dropped and the caller fetches it again.
    private func serveComplete(fd: CInt, size: Int64, _ request: Request, response: ResponseChannel,
                               source: Counter) async throws -> HTTPResponseStatus? {
        let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
        var held = true
        defer {
            if held {
                try? handle.close()
                store.release(request.digest)
            }
        }
        let contentType = request.kind == .manifest ? MediaType.ofCachedManifest(fd: fd, size: size)?.value : nil
        if size <= store.smallBlobs.maxBlobSize, let bytes = await response.readWhole(handle, size: size) {
            guard request.digest.matches(bytes) else {
                // Let go of the file before it goes: a reader still counted
                // on it would keep the index entry of a copy that replaces it.
                held = false
                try? handle.close()
                store.release(request.digest)
                store.discardDamaged(request.digest)
                metrics.digestMismatches.increment()
                return nil
            }
            store.smallBlobs.put(request.digest, bytes, kind: request.kind, contentType: contentType)
            return try await sendFromMemory(bytes, contentType: contentType, request, response: response, source: source)
        }
        let (status, range, headers) = plan(request, length: size, contentType: contentType)
        guard let range, !range.isEmpty else {
            try await response.send(status, headers: headers, body: ByteBuffer())
            return status
        }
        try await response.fileResponse(status, headers, handle, range: range)
        source.increment(by: Int64(range.count))
        return status
    }

    /// A whole blob or manifest held in memory, as the request asked for it
    /// (a range, or all).
    private func sendFromMemory(_ bytes: ByteBuffer, contentType: String?, _ request: Request,
                                response: ResponseChannel, source: Counter) async throws -> HTTPResponseStatus {
        let (status, range, headers) = plan(request, length: Int64(bytes.readableBytes), contentType: contentType)
        let body = range.flatMap { bytes.getSlice(at: bytes.readerIndex + Int($0.lowerBound), length: $0.count) }
        try await response.send(status, headers: headers, body: body ?? ByteBuffer())
        source.increment(by: Int64(body?.readableBytes ?? 0))
        return status
    }

    /// Sends the blob from the growing file, never past what the fill allows
    /// (the verified tail is held back until the digest matched), and never
    /// the last byte of the answer before the digest is verified: until
    /// then a client cannot hold a complete-looking response, whatever range
    /// it asked for.
    ///
    /// Returns nil when the fill ended before this follower could pick up
    /// its file and the blob was not kept (a full disk, a blob too large to
    /// keep): the caller asks again.
    private func follow(_ fill: Fill, follower: Int, first: FillSnapshot, _ request: Request,
                        response: ResponseChannel) async throws -> HTTPResponseStatus? {
        var handle: NIOFileHandle?
        switch fill.openReader() {
        case .file(let fd):
            handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
        case .memory:
            handle = nil
        case .unavailable(let error):
            store.openFailed(error)
            return try await sendOverloaded(response)
        case .over:
            switch fill.state {
            case .published:
                if case .file(let fd, let size) = store.openCached(request.digest) {
                    return try await serveComplete(fd: fd, size: size, request, response: response,
                                                   source: metrics.bytesFromUpstream)
                }
                return nil
            case .delivered:
                return nil
            default:
                let error = OCIError(.badGateway, .unavailable, "the upstream blob download failed")
                try await response.send(error)
                return error.status
            }
        }
        defer { try? handle?.close() }
        let contentType = first.head?.contentType
        let (status, range, headers): (HTTPResponseStatus, Range<Int64>?, HTTPHeaders)
        if let length = first.head?.contentLength {
            (status, range, headers) = plan(request, length: length, contentType: contentType)
        } else {
            // Unknown length (a chunked upstream): the whole blob, chunked.
            var h = BlobResponsePlan.headers(for: request.digest, length: nil, contentType: contentType)
            h.remove(name: "accept-ranges")
            (status, range, headers) = (.ok, 0..<Int64.max, h)
        }
        guard let range else {
            try await response.send(status, headers: headers, body: ByteBuffer())
            return status
        }
        if range.isEmpty {
            // With nothing to send, the head alone is a complete answer: it
            // waits for the digest like the last byte of any other.
            let verdict = await fill.next(after: .max, follower: follower)
            try response.checkClientPresent()
            switch verdict.state {
            case .verified, .published, .delivered:
                try await response.send(status, headers: headers, body: ByteBuffer())
                return status
            default:
                let error = OCIError(.badGateway, .unavailable, "the upstream blob download failed")
                try await response.send(error)
                return error.status
            }
        }
        // Registered already: from here on the memory window keeps what
        // this follower needs; if it lost some before, ask again.
        guard fill.holds(from: range.lowerBound) else { return nil }
        fill.needs(upTo: range.upperBound, follower: follower)
        response.head(status, headers)
        response.flush()
        var sent = range.lowerBound
        while true {
            // All but the last byte sent: only the verdict is left to wait for.
            let snapshot = await fill.next(after: sent < range.upperBound - 1 ? sent : .max, follower: follower,
                                           position: sent)
            try response.checkClientPresent()
            let verified: Bool
            let available: Int64
            switch snapshot.state {
            case .failed, .rejected:
                response.abort()
                return status
            case .verified(let size), .published(let size), .delivered(let size):
                (verified, available) = (true, size)
            default:
                (verified, available) = (false, snapshot.mark)
            }
            let limit = min(verified ? range.upperBound : range.upperBound - 1, available)
            while sent < limit {
                // From the file while the disk held the bytes, else from
                // the fill's memory window, one batch at a time.
                let end: Int64
                if let handle, sent < snapshot.fileEnd {
                    end = min(limit, snapshot.fileEnd)
                    try await response.file(handle, range: sent..<end)
                } else if let bytes = fill.memoryBytes(from: sent, upTo: limit) {
                    end = sent + Int64(bytes.readableBytes)
                    try await response.body(bytes)
                } else {
                    response.abort()  // cannot happen: the window keeps what followers need
                    return status
                }
                metrics.bytesFromUpstream.increment(by: end - sent)
                sent = end
                fill.reached(sent, follower: follower)
            }
            if verified { break }
        }
        try await response.end()
        return status
    }

    private func plan(_ request: Request, length: Int64, contentType: String?)
        -> (HTTPResponseStatus, Range<Int64>?, HTTPHeaders) {
        let plan = BlobResponsePlan(digest: request.digest, length: length, contentType: contentType,
                                    rangeHeader: request.head.headers.first(name: "range"))
        return (plan.status, plan.range, plan.headers)
    }

    /// The client's headers the fill may send upstream: its credentials
    /// (and, for a manifest, the media types it accepts: the upstream picks
    /// the answer by them), nothing about this hop.
    static func upstreamHeaders(_ headers: HTTPHeaders, kind: ContentKind) -> HTTPHeaders {
        var out = HTTPHeaders()
        // Whole values: a credential may hold commas (Digest, some tokens),
        // and splitting it (`[canonicalForm:]`) would change what it says.
        for name in kind == .manifest ? ["authorization", "user-agent", "accept"] : ["authorization", "user-agent"] {
            for value in headers[name] { out.add(name: name, value: value) }
        }
        // A client that names no manifest type is asked for as one that
        // takes them all: registries answer 404 to an index asked for
        // without its type. One place for the fill, the access check and
        // the tag's `HEAD`.
        if kind == .manifest, !out.contains(name: "accept") { out.add(name: "accept", value: MediaType.manifestAccept) }
        return out
    }
}
