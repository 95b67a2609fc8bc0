import AsyncAlgorithms
import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import ProxyMetrics

/// Streams a request to its upstream and the answer back, both ways at once
/// and never buffered whole: manifests, tags, the `/v2/` ping, token
/// challenges, referrers and uploads all go this way, so tags stay fresh and
/// the upstream stays the authority on who may read what.
struct PassThrough: Sendable {
    let client: UpstreamClient
    let metrics: ProxyMetrics

    /// What the request came with, besides the head.
    struct Origin: Sendable {
        let clientAddress: String?
        let clientHost: String?
    }

    /// A request body being streamed from the client while it is forwarded.
    struct RequestBody: Sendable {
        let stream: AsyncChannel<ByteBuffer>
        let length: HTTPClientRequest.Body.Length
    }

    /// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
    static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-connection",
    ]

    static func endToEnd(_ headers: HTTPHeaders) -> HTTPHeaders {
        var named = hopByHop
        for value in headers[canonicalForm: "connection"] { named.insert(value.lowercased()) }
        var out = HTTPHeaders()
        for (name, value) in headers where !named.contains(name.lowercased()) {
            out.add(name: name, value: value)
        }
        return out
    }

    /// Forwards the request; `body` carries the request body when it has one.
    /// Returns the status sent to the client.
    func forward(
        _ head: HTTPRequestHead, to upstream: ProxyConfig.Upstream, body: RequestBody?,
        origin: Origin, response: ResponseChannel
    ) async throws -> HTTPResponseStatus {
        var request = HTTPClientRequest(url: upstream.origin + Self.upstreamURI(head.uri))
        request.method = head.method
        var headers = Self.endToEnd(head.headers)
        headers.remove(name: "host")
        headers.remove(name: "content-length")
        if let address = origin.clientAddress {
            let prior = headers[canonicalForm: "x-forwarded-for"].joined(separator: ", ")
            headers.replaceOrAdd(name: "x-forwarded-for", value: prior.isEmpty ? address : "\(prior), \(address)")
        }
        if let host = origin.clientHost {
            headers.replaceOrAdd(name: "x-forwarded-host", value: host)
        }
        headers.replaceOrAdd(name: "x-forwarded-proto", value: "http")
        request.headers = headers
        if let body { request.body = .stream(body.stream, length: body.length) }

        let upstreamResponse: HTTPClientResponse
        do {
            upstreamResponse = try await client.execute(request)
        } catch {
            metrics.upstreamResponse(upstream: upstream.host, code: 0)
            let mapped = UpstreamClient.clientError(for: error)
            try await response.send(mapped, omitBody: head.method == .HEAD)
            return mapped.status
        }
        metrics.upstreamResponse(upstream: upstream.host, code: Int(upstreamResponse.status.code))

        var outHeaders = Self.endToEnd(upstreamResponse.headers)
        if let location = outHeaders.first(name: "location"), let host = origin.clientHost {
            outHeaders.replaceOrAdd(name: "location", value: Self.rewriteLocation(location, upstream: upstream, clientHost: host))
        }
        response.head(upstreamResponse.status, outHeaders)
        do {
            for try await chunk in upstreamResponse.body {
                try await response.body(chunk)
            }
        } catch {
            // Headers are out: the only honest signal left is a cut.
            response.abort()
            throw error
        }
        try await response.end()
        return upstreamResponse.status
    }

    /// The request target as the upstream should see it: containerd's `ns`
    /// parameter is for mirrors and dropped.
    static func upstreamURI(_ uri: String) -> String {
        guard let q = uri.firstIndex(of: "?") else { return uri }
        let kept = uri[uri.index(after: q)...].split(separator: "&").filter { !$0.hasPrefix("ns=") }
        let path = String(uri[..<q])
        return kept.isEmpty ? path : path + "?" + kept.joined(separator: "&")
    }

    /// An absolute `Location` pointing at the upstream (an upload session,
    /// say) is rewritten to the client's host, so the client keeps talking to
    /// the proxy. Locations elsewhere (a CDN) are left alone.
    static func rewriteLocation(_ location: String, upstream: ProxyConfig.Upstream, clientHost: String) -> String {
        let candidates = [upstream.origin, "\(upstream.schema)://\(upstream.registry):\(upstream.port)"]
        for prefix in candidates where location.lowercased().hasPrefix(prefix.lowercased()) {
            let rest = location.dropFirst(prefix.count)
            if rest.isEmpty || rest.hasPrefix("/") || rest.hasPrefix("?") {
                return "http://\(clientHost)\(rest)"
            }
        }
        return location
    }
}
