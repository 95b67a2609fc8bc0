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

    /// Where the request came from, as the client sees the proxy.
    struct Origin: Sendable {
        let clientAddress: String?
        /// The host the client addressed (its `Host`, or a trusted
        /// `X-Forwarded-Host`).
        let clientHost: String?
        /// `http` or `https`: the listener's scheme, or a trusted
        /// `X-Forwarded-Proto` from a TLS terminator in front.
        let clientScheme: String
        /// Whether the client's own forwarding headers are believed.
        let trusted: Bool

        /// Reads the head once per request. Forwarding headers are believed
        /// only when `api.trust_forwarded_headers` says a terminator in
        /// front sets them; otherwise any client could choose the scheme
        /// and host of the `Location` headers it gets back.
        init(head: HTTPRequestHead, clientAddress: String?, listenerScheme: String, trustForwarded: Bool) {
            self.clientAddress = clientAddress
            self.trusted = trustForwarded
            let host = head.headers.first(name: "host")
            guard trustForwarded else {
                (clientHost, clientScheme) = (host, listenerScheme)
                return
            }
            let proto = head.headers.first(name: "x-forwarded-proto")?.lowercased()
            clientScheme = proto == "https" || proto == "http" ? proto ?? listenerScheme : listenerScheme
            clientHost = head.headers.first(name: "x-forwarded-host") ?? host
        }
    }

    /// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
    static let hopByHop: Set<String> = [
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-connection",
    ]

    /// What clients claim about earlier hops (addresses, scheme, host, port,
    /// prefix, the original URL): believed only from a trusted terminator.
    static let forwardingHeaders = [
        "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-forwarded-prefix",
        "x-forwarded-server", "forwarded", "x-real-ip", "true-client-ip", "cf-connecting-ip", "x-client-ip",
        "x-original-url", "x-rewrite-url",
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

    /// What a caller may do with an upstream answer before it is passed on
    /// (`PingMemory`): see it, or answer instead when the upstream failed.
    struct Observer: Sendable {
        /// Called with each answer the upstream gave.
        var answered: @Sendable (HTTPResponseStatus, HTTPHeaders) -> Void = { _, _ in }
        /// Called when the upstream could not be reached or answered 429 or
        /// 5xx, before anything is sent: returns the status it answered the
        /// client with, or nil to pass the failure on.
        var failed: (@Sendable () async throws -> HTTPResponseStatus?)?
    }

    /// Forwards the request; `body` carries the request body when it has one.
    /// Returns the status sent to the client.
    func forward(
        _ head: HTTPRequestHead, to upstream: ProxyConfig.Upstream, body: RequestBodySource?,
        origin: Origin, response: ResponseChannel, observer: Observer? = nil
    ) async throws -> HTTPResponseStatus {
        // The validator lets only origin-form targets through; checked again
        // here because this is where a target becomes a URL.
        guard head.uri.hasPrefix("/") else {
            let error = OCIError(.badRequest, .unsupported, "the request target must be a path starting with /")
            try await response.send(error, omitBody: head.method == .HEAD)
            return error.status
        }
        var request = HTTPClientRequest(url: upstream.origin + Self.upstreamURI(head.uri))
        request.method = head.method
        var headers = Self.endToEnd(head.headers)
        headers.remove(name: "host")
        headers.remove(name: "content-length")
        if !origin.trusted {
            // Whatever a client says about earlier hops is its own claim: an
            // upstream that rate-limits or logs by address must see ours.
            for name in Self.forwardingHeaders { headers.remove(name: name) }
        }
        if let address = origin.clientAddress {
            let prior = headers[canonicalForm: "x-forwarded-for"].joined(separator: ", ")
            headers.replaceOrAdd(name: "x-forwarded-for", value: prior.isEmpty ? address : "\(prior), \(address)")
        }
        if let host = origin.clientHost {
            headers.replaceOrAdd(name: "x-forwarded-host", value: host)
        }
        headers.replaceOrAdd(name: "x-forwarded-proto", value: origin.clientScheme)
        request.headers = headers

        let upstreamResponse: HTTPClientResponse
        do {
            upstreamResponse = try await client.send(request, to: upstream, body: body)
        } catch {
            metrics.upstreamAnswered(upstream, method: head.method, response: nil)
            client.logger.notice("upstream request failed", metadata: [
                "upstream": "\(upstream.host)", "method": "\(head.method.rawValue)", "error": "\(error)"])
            if let failed = observer?.failed, let status = try await failed() { return status }
            let mapped = UpstreamClient.clientError(for: error)
            try await response.send(mapped, omitBody: head.method == .HEAD)
            return mapped.status
        }
        metrics.upstreamAnswered(upstream, method: head.method, response: upstreamResponse)
        if let observer {
            let code = upstreamResponse.status.code
            observer.answered(upstreamResponse.status, upstreamResponse.headers)
            if code == 429 || code >= 500, let failed = observer.failed, let status = try await failed() {
                return status
            }
        }

        var outHeaders = Self.endToEnd(upstreamResponse.headers)
        if let location = outHeaders.first(name: "location"), let host = origin.clientHost {
            outHeaders.replaceOrAdd(name: "location", value: Self.rewriteLocation(
                location, upstream: upstream, clientHost: host, clientScheme: origin.clientScheme))
        }
        response.head(upstreamResponse.status, outHeaders)
        do {
            let body = upstreamResponse.body
            try await UpstreamBody.read(idle: client.idleTimeout) { clock in
                for try await chunk in body {
                    clock.tick()
                    try await clock.paused { try await response.body(chunk) }
                }
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
    static func rewriteLocation(_ location: String, upstream: ProxyConfig.Upstream, clientHost: String,
                                clientScheme: String) -> String {
        let candidates = [upstream.origin, "\(upstream.schema)://\(upstream.registry):\(upstream.port)"]
        for prefix in candidates where location.lowercased().hasPrefix(prefix.lowercased()) {
            let rest = location.dropFirst(prefix.count)
            if rest.isEmpty || rest.hasPrefix("/") || rest.hasPrefix("?") {
                return "\(clientScheme)://\(clientHost)\(rest)"
            }
        }
        return location
    }
}
