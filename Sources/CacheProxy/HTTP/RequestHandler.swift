import AsyncAlgorithms
import AsyncHTTPClient
import Logging
import NIOCore
import NIOHTTP1
import ProxyMetrics

/// Where a request goes: local endpoint, blob cache or pass-through. One
/// call per request, after the head is in.
struct RequestHandler: Sendable {
    let live: LiveConfig
    let blobs: BlobResponder
    let tags: TagResolver
    let pings: PingMemory
    let passThrough: PassThrough
    let metrics: ProxyMetrics
    let tracker: ConnectionTracker
    let logger: Logger
    let requestLog: RequestLog
    let trustForwardedHeaders: Bool

    /// Whether the request has a body to stream. Only a pass-through uses
    /// it; for any other request the connection drops it after answering.
    static func hasBody(_ head: HTTPRequestHead) -> Bool {
        if let length = head.headers.first(name: "content-length") { return length != "0" }
        return head.headers.contains(name: "transfer-encoding")
    }

    /// `handed`: the upstream's answer to a tag's `HEAD` the event loop made
    /// for this request (`TagLookup`), if it did; the request's time counts
    /// from when the loop got it.
    func handle(_ head: HTTPRequestHead, body: RequestBodySource?, origin: PassThrough.Origin,
                handed: TagHandOff.Handed? = nil, response: ResponseChannel) async {
        let started = handed?.started ?? ContinuousClock.now
        var kind = "error"
        var status = HTTPResponseStatus.internalServerError
        do {
            (kind, status) = try await route(head, body: body, origin: origin, handed: handed, response: response)
        } catch {
            // The path only: a query may carry a signed URL's token.
            logger.debug("request ended early", metadata: ["path": "\(RequestURI.path(of: head.uri))", "error": "\(error)"])
            response.abort()
            // Counted as what the client was answered, when it was: most
            // often a client that read its whole answer and left before
            // the last (empty) write.
            let record = response.record.withLockedValue { $0 }
            if let sent = record.status, let routed = record.kind { (kind, status) = (routed, sent) }
        }
        let seconds = started.duration(to: .now).inSeconds
        metrics.requestFinished(kind: kind, method: head.method.rawValue, code: Int(status.code), seconds: seconds)
        if requestLog.enabled {
            let record = response.record.withLockedValue { $0 }
            let answer: RequestLog.Answer
            switch kind {
            case "local": answer = .local
            case "passthrough": answer = record.answer ?? .passthrough
            case "error": answer = .error
            default: answer = record.answer ?? .error
            }
            requestLog.record(.init(client: origin.clientAddress, method: head.method.rawValue, uri: head.uri,
                                    host: head.headers.first(name: "host"), upstream: record.upstream,
                                    status: Int(status.code), bytes: record.bytes, seconds: seconds, answer: answer,
                                    cut: record.isCut))
        }
        if let headSent = response.headSentAt.withLockedValue({ $0 }) {
            metrics.timeToFirstByte(kind: kind, seconds: started.duration(to: headSent).inSeconds)
        }
    }

    private func route(_ head: HTTPRequestHead, body: RequestBodySource?, origin: PassThrough.Origin,
                       handed: TagHandOff.Handed?, response: ResponseChannel) async throws -> (String, HTTPResponseStatus) {
        let omitBody = head.method == .HEAD
        let target: RequestTarget
        do {
            target = try RequestTarget.classify(method: head.method.rawValue, uri: head.uri)
        } catch {
            let oci: OCIError
            switch error {
            case .nameInvalid(let message): oci = OCIError(.badRequest, .nameInvalid, message)
            case .digestInvalid(let message): oci = OCIError(.badRequest, .digestInvalid, message)
            }
            try await response.send(oci, omitBody: omitBody)
            return ("error", oci.status)
        }

        switch target {
        case .metrics:
            try await response.send(.ok, headers: ["content-type": "text/plain; version=0.0.4; charset=utf-8"],
                                    body: ByteBuffer(string: metrics.exposition()), omitBody: omitBody)
            return ("local", .ok)
        case .healthz:
            try await response.send(.ok, headers: ["content-type": "text/plain"], body: ByteBuffer(string: "ok\n"),
                                    omitBody: omitBody)
            return ("local", .ok)
        case .readyz:
            let ready = !tracker.isDraining
            let status: HTTPResponseStatus = ready ? .ok : .serviceUnavailable
            try await response.send(status, headers: ["content-type": "text/plain"],
                                    body: ByteBuffer(string: ready ? "ready\n" : "draining\n"), omitBody: omitBody)
            return ("local", status)
        case .blob, .manifest, .ping, .passThrough:
            break
        }

        let host = head.headers.first(name: "host")
        guard let upstream = live.router.route(host: host, namespace: RequestURI.queryValue("ns", in: head.uri)) else {
            let oci = OCIError(.notFound, .nameUnknown, "no upstream is configured for host \"\(host ?? "")\"")
            try await response.send(oci, omitBody: omitBody)
            return ("error", oci.status)
        }
        response.record.withLockedValue {
            $0.upstream = upstream.host
            switch target {
            case .blob: $0.kind = "blob"
            case .manifest where upstream.manifests == .revalidate: $0.kind = "manifest"
            default: $0.kind = "passthrough"
            }
        }

        switch target {
        case .blob(let name, let digest):
            let status = try await blobs.respond(
                .init(head: head, name: name, digest: digest, upstream: upstream, origin: origin), response: response)
            return ("blob", status)
        case .manifest(let name, .digest(let digest)) where upstream.manifests == .revalidate:
            let status = try await blobs.respond(
                .init(head: head, name: name, digest: digest, upstream: upstream, origin: origin, kind: .manifest),
                response: response)
            return ("manifest", status)
        case .manifest(let name, .tag(let tag)) where upstream.manifests == .revalidate:
            let status = try await tags.respond(
                .init(head: head, name: name, tag: tag, upstream: upstream, origin: origin),
                asked: handed?.asked(of: upstream),
                response: response)
            return ("manifest", status)
        case .ping where upstream.manifests == .revalidate:
            let status = try await passThrough.forward(head, to: upstream, body: body, origin: origin,
                                                       response: response, observer: pingObserver(head, upstream, response))
            return ("passthrough", status)
        default:
            let status = try await passThrough.forward(head, to: upstream, body: body, origin: origin,
                                                       response: response)
            return ("passthrough", status)
        }
    }

    /// The ping's answers are remembered; offline, the last one answers.
    private func pingObserver(_ head: HTTPRequestHead, _ upstream: ProxyConfig.Upstream,
                              _ response: ResponseChannel) -> PassThrough.Observer {
        let pings = self.pings
        var observer = PassThrough.Observer(answered: { status, headers in
            pings.record(upstream: upstream.host, status: status, headers: headers)
        })
        guard upstream.offline == .serve else { return observer }
        observer.failed = {
            guard let (status, headers, body) = pings.answer(upstream: upstream.host, headers: head.headers) else {
                return nil
            }
            try await response.send(status, headers: headers, body: body, omitBody: head.method == .HEAD)
            return status
        }
        return observer
    }
}
