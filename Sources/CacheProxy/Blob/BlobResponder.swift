import NIOCore
import NIOHTTP1
import Prometheus
import ProxyMetrics
#if canImport(Glibc)
import Glibc
#endif

/// Answers `GET`/`HEAD /v2/<name>/blobs/<digest>`: from the cache when the
/// blob is there, otherwise by following the (one) fill for the digest.
/// Every byte a client gets comes from a file with `sendfile`.
struct BlobResponder: Sendable {
    let store: BlobStore
    let fills: FillRegistry
    let passThrough: PassThrough
    let metrics: ProxyMetrics

    struct Request: Sendable {
        let head: HTTPRequestHead
        let name: String
        let digest: Digest
        let upstream: ProxyConfig.Upstream
        let origin: PassThrough.Origin
    }

    func respond(_ request: Request, response: ResponseChannel) async throws -> HTTPResponseStatus {
        let isHead = request.head.method == .HEAD
        if isHead, let size = store.size(of: request.digest) {
            metrics.blobHits.increment()
            response.head(.ok, BlobResponsePlan.headers(for: request.digest, length: size, contentType: nil))
            try await response.end()
            return .ok
        }
        if !isHead, let (fd, size) = store.openCached(request.digest) {
            metrics.blobHits.increment()
            return try await serveComplete(fd: fd, size: size, request, response: response, source: metrics.bytesFromCache)
        }
        if isHead {
            // A HEAD miss asks the upstream and stores nothing: no bytes to keep.
            return try await passThrough.forward(request.head, to: request.upstream, body: nil,
                                                 origin: request.origin, response: response)
        }

        // A blob GET is never passed through: every byte a client gets has
        // gone through a fill that checks the digest.
        var attempt = 0
        while true {
            attempt += 1
            let (fill, joined) = fills.fill(for: request.digest, upstream: request.upstream,
                                            repository: request.name, headers: Self.upstreamHeaders(request.head))
            (joined ? metrics.coalescedFollowers : metrics.blobMisses).increment()
            let first = await fill.next(after: -1)
            switch first.state {
            case .rejected where joined && attempt == 1:
                // The upstream refused someone else's credentials (401, 403,
                // 404...): ask again, as the leader of a fill with this
                // client's own.
                continue
            case .rejected, .failed:
                if let answer = first.answer {
                    var headers = PassThrough.endToEnd(answer.headers)
                    headers.remove(name: "content-length")
                    try await response.send(answer.status, headers: headers, body: answer.body)
                    return answer.status
                }
                let error = OCIError(.badGateway, .unavailable, "upstream blob download failed")
                try await response.send(error)
                return error.status
            default:
                return try await follow(fill, first: first, request, response: response)
            }
        }
    }

    /// Serves a complete file (a hit, or a fill that finished before this
    /// follower could pick up its descriptor). Takes ownership of `fd`.
    private func serveComplete(fd: CInt, size: Int64, _ request: Request, response: ResponseChannel,
                               source: Counter) async throws -> HTTPResponseStatus {
        let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
        defer { try? handle.close() }
        let (status, range, headers) = plan(request, length: size, contentType: nil)
        guard let range, !range.isEmpty else {
            try await response.send(status, headers: headers, body: ByteBuffer())
            return status
        }
        try await response.fileResponse(status, headers, handle, range: range)
        source.increment(by: Int64(range.count))
        return status
    }

    /// Sends the blob from the growing file, never past what the fill allows
    /// (the verified tail is held back until the digest matched).
    private func follow(_ fill: Fill, first: FillSnapshot, _ request: Request,
                        response: ResponseChannel) async throws -> HTTPResponseStatus {
        guard let fd = fill.openReader() else {
            if case .published = fill.state, let (fd, size) = store.openCached(request.digest) {
                return try await serveComplete(fd: fd, size: size, request, response: response,
                                               source: metrics.bytesFromUpstream)
            }
            let error = OCIError(.badGateway, .unavailable, "upstream blob download failed")
            try await response.send(error)
            return error.status
        }
        let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
        defer { try? handle.close() }
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
        response.head(status, headers)
        response.flush()
        var sent = range.lowerBound
        while sent < range.upperBound {
            let snapshot = await fill.next(after: sent)
            let limit: Int64
            switch snapshot.state {
            case .failed, .rejected:
                response.abort()
                return status
            case .verified(let size), .published(let size):
                limit = min(range.upperBound, size)
            default:
                limit = min(range.upperBound, snapshot.mark)
            }
            if limit > sent {
                try await response.file(handle, range: sent..<limit)
                metrics.bytesFromUpstream.increment(by: limit - sent)
                sent = limit
            }
            if case .verified = snapshot.state { break }
            if case .published = snapshot.state { break }
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

    /// The client's headers the fill may send upstream: its credentials and
    /// what it accepts, nothing about this hop.
    static func upstreamHeaders(_ head: HTTPRequestHead) -> HTTPHeaders {
        var out = HTTPHeaders()
        for name in ["authorization", "user-agent"] {
            for value in head.headers[canonicalForm: name] { out.add(name: name, value: String(value)) }
        }
        return out
    }
}
