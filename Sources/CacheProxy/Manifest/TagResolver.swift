import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import ProxyMetrics

/// Answers `GET`/`HEAD /v2/<name>/manifests/<tag>` (DESIGN.md, Manifest by
/// tag): the upstream names the digest, the cache serves the body.
///
/// The upstream is asked with a `HEAD` carrying the client's `Accept` and
/// credentials, every time: tags stay exactly as fresh as the upstream says,
/// the upstream still decides who may read them, and a `HEAD` costs nothing
/// against Docker Hub's pull limit. Its `Docker-Content-Digest` names the
/// manifest, which is then content like any other: served from the cache
/// when there, else fetched by digest through the one fill path, which
/// verifies it. When the upstream cannot answer, the tag's last digest is
/// served to a client the upstream allowed before (`offline: serve`).
///
/// A `GET` names the manifest the tag named last in the `HEAD`'s
/// `If-None-Match` (`TagTable.expected`, as `TagLookup` does on the loop):
/// the upstream's 304 then stands for the 200 naming it, and costs the
/// registry less (distribution skips reading the manifest).
struct TagResolver: Sendable {
    let blobs: BlobResponder
    let tags: TagTable
    let client: UpstreamClient
    let gate: AccessGate
    let metrics: ProxyMetrics

    struct Request: Sendable {
        let head: HTTPRequestHead
        let name: String
        let tag: String
        let upstream: ProxyConfig.Upstream
        let origin: PassThrough.Origin

        var key: TagTable.Key { TagTable.Key(upstream: upstream.host, repository: name, tag: tag) }

        /// The same request, for the manifest the tag names.
        func content(_ digest: Digest) -> BlobResponder.Request {
            BlobResponder.Request(head: head, name: name, digest: digest, upstream: upstream, origin: origin,
                                  kind: .manifest, admitted: true)
        }
    }

    /// What kept the upstream from naming a digest.
    private enum Failure {
        case unreachable(OCIError)
        case answered(HTTPResponseStatus, HTTPHeaders)
    }

    /// The upstream's answer to the tag's `HEAD`, or why none came.
    /// `TagLookup` asks on the event loop and hands what it got here when
    /// the answer is not one it can write itself, so the upstream is never
    /// asked twice for one request.
    enum Asked: Sendable {
        case answered(HTTPResponseStatus, HTTPHeaders)
        case failed(any Error)
    }

    func respond(_ request: Request, asked: Asked? = nil, response: ResponseChannel) async throws -> HTTPResponseStatus {
        let upstream = request.upstream
        let status: HTTPResponseStatus
        let headers: HTTPHeaders
        var expected: TagTable.Entry?
        switch asked {
        case .answered(let answered, let answeredHeaders)?:
            (status, headers) = (answered, answeredHeaders)
        case .failed(let error)?:
            return try await unreachable(request, error: error, response: response)
        case nil:
            var ask = HTTPClientRequest(url: "\(upstream.origin)/v2/\(request.name)/manifests/\(request.tag)")
            ask.method = .HEAD
            ask.headers = BlobResponder.upstreamHeaders(request.head.headers, kind: .manifest)
            expected = tags.expect(request.key, method: request.head.method, headers: &ask.headers)
            let answer: HTTPClientResponse
            do {
                answer = try await client.send(ask, to: upstream)
            } catch {
                metrics.upstreamAnswered(upstream, method: .HEAD, response: nil)
                return try await unreachable(request, error: error, response: response)
            }
            metrics.upstreamAnswered(upstream, method: .HEAD, response: answer)
            if let expected,
               expected.isConfirmed(by: answer.status, digestField: answer.headers.first(name: "docker-content-digest")) {
                (status, headers) = (.ok, expected.namedHeaders)
            } else {
                (status, headers) = (answer.status, answer.headers)
            }
        }
        switch status.code {
        case 200:
            guard let digest = headers.first(name: "docker-content-digest").flatMap({ try? Digest(parsing: Substring($0)) })
            else {
                // No digest to cache under (not a registry this proxy knows
                // how to cache for): the request goes as it came.
                response.answered(.passthrough)
                return try await blobs.passThrough.forward(request.head, to: upstream, body: nil,
                                                           origin: request.origin, response: response)
            }
            Self.remember(digest, mediaType: headers.first(name: "content-type").flatMap(MediaType.init),
                          key: request.key, upstream: upstream, clientHeaders: request.head.headers,
                          repository: request.name, tags: tags, gate: gate, superseding: expected)
            if request.head.method == .HEAD {
                response.answered(.passthrough)
                // The upstream's own answer: its type, length and digest.
                response.head(.ok, PassThrough.endToEnd(headers))
                try await response.end()
                return .ok
            }
            return try await blobs.respond(request.content(digest), response: response)
        case 429, 500...:
            return try await offline(request, failure: .answered(status, headers), response: response)
        case 300..<400:
            // A registry that redirects its manifests elsewhere
            // (registry.k8s.io): the client follows, as before this cache.
            response.answered(.passthrough)
            return try await blobs.passThrough.forward(request.head, to: upstream, body: nil,
                                                       origin: request.origin, response: response)
        default:
            // A refusal (401 and its challenge, 403, 404) goes to the client
            // as the upstream gave it: the token dance works unchanged. It
            // also ends what the offline memory held for this client: a
            // revoked credential, or a tag deleted upstream, is not served
            // at the next outage.
            let held = gate.refused(upstream: upstream, headers: request.head.headers, repository: request.name,
                                    status: status)
            if status == .notFound, held {
                tags.remove(request.key, accept: BlobResponder.upstreamHeaders(request.head.headers, kind: .manifest)["accept"])
            }
            return try await send(.answered(status, headers), request, response: response)
        }
    }

    /// The upstream's 200 for the tag, naming `digest` (its
    /// `Docker-Content-Digest`) of `mediaType`: remembered as the tag's and
    /// as the upstream's yes to this client for that manifest. One place for
    /// both the event loop's lookup and this one.
    static func remember(_ digest: Digest, mediaType: MediaType?, key: TagTable.Key, upstream: ProxyConfig.Upstream,
                         clientHeaders: HTTPHeaders, repository: String, tags: TagTable,
                         gate: AccessGate, memo: AccessGate.CredentialMemo? = nil,
                         superseding expected: TagTable.Entry? = nil) {
        if let mediaType { tags.record(key, digest: digest, mediaType: mediaType, superseding: expected) }
        // The upstream's yes to this client for this repository, and the
        // manifest's place in it: the body may come from the cache.
        gate.remember(upstream: upstream, headers: clientHeaders, repository: repository, digest: digest,
                      kind: .manifest, memo: memo)
    }

    private func unreachable(_ request: Request, error: any Error, response: ResponseChannel) async throws
        -> HTTPResponseStatus {
        client.logger.notice("tag look-up failed", metadata: [
            "upstream": "\(request.upstream.host)", "repository": "\(request.name)", "error": "\(error)"])
        return try await offline(request, failure: .unreachable(UpstreamClient.clientError(for: error)),
                                 response: response)
    }

    /// The tag's last digest, when the offline policy serves it to this
    /// client; otherwise the upstream's failure.
    private func offline(_ request: Request, failure: Failure,
                         response: ResponseChannel) async throws -> HTTPResponseStatus {
        guard request.upstream.offline == .serve,
              let entry = tags.candidates(request.key, accept: request.head.headers["accept"]).first(where: {
                  blobs.store.size(of: $0.digest) != nil
                      && gate.allowedBefore(upstream: request.upstream, headers: request.head.headers,
                                            repository: request.name, digest: $0.digest, kind: .manifest)
              })
        else {
            return try await send(failure, request, response: response)
        }
        response.answered(.offline)
        let status = try await blobs.respond(request.content(entry.digest), response: response)
        if status == .ok { metrics.manifestsOffline.increment() }
        return status
    }

    private func send(_ failure: Failure, _ request: Request, response: ResponseChannel) async throws
        -> HTTPResponseStatus {
        let omitBody = request.head.method == .HEAD
        switch failure {
        case .unreachable(let error):
            response.answered(.error)
            try await response.send(error, omitBody: omitBody)
            return error.status
        case .answered(let status, let upstreamHeaders):
            response.answered(.passthrough)
            try await BlobResponder.sendUpstreamAnswer(status, upstreamHeaders, kind: .manifest, omitBody: omitBody,
                                                       response: response)
            return status
        }
    }
}
