import NIOHTTP1

/// Status, byte range and headers of a blob response, honouring `Range`.
/// Shared by the event-loop hit path and the async follower path so both
/// answer byte-for-byte alike.
struct BlobResponsePlan {
    let status: HTTPResponseStatus
    /// `nil`: no body (416).
    let range: Range<Int64>?
    let headers: HTTPHeaders

    init(digest: Digest, length: Int64, contentType: String?, rangeHeader: String?) {
        var headers = Self.headers(for: digest, length: length, contentType: contentType)
        guard let rangeHeader, let byteRange = ByteRange(header: rangeHeader) else {
            (status, range, self.headers) = (.ok, 0..<length, headers)
            return
        }
        guard let closed = byteRange.resolve(size: length) else {
            headers.replaceOrAdd(name: "content-range", value: "bytes */\(length)")
            headers.replaceOrAdd(name: "content-length", value: "0")
            (status, range, self.headers) = (.rangeNotSatisfiable, nil, headers)
            return
        }
        headers.replaceOrAdd(name: "content-length", value: String(closed.count))
        headers.replaceOrAdd(name: "content-range", value: "bytes \(closed.lowerBound)-\(closed.upperBound)/\(length)")
        (status, range, self.headers) = (.partialContent, closed.lowerBound..<(closed.upperBound + 1), headers)
    }

    /// A whole-blob 200 with headers built earlier.
    init(whole length: Int, headers: HTTPHeaders) {
        (status, range, self.headers) = (.ok, 0..<Int64(length), headers)
    }

    /// The headers every blob answer carries. The proxy sets
    /// `Docker-Content-Digest` itself: CDNs behind a registry do not.
    static func headers(for digest: Digest, length: Int64?, contentType: String?) -> HTTPHeaders {
        let text = digest.description
        var headers: HTTPHeaders = [
            "content-type": contentType ?? "application/octet-stream",
            "docker-content-digest": text,
            "etag": "\"\(text)\"",
            "accept-ranges": "bytes",
        ]
        if let length { headers.add(name: "content-length", value: String(length)) }
        return headers
    }
}
