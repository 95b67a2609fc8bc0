import AsyncHTTPClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOSSL
import ProxyMetrics

/// The HTTP client every upstream request goes through (but for the tag
/// `HEAD`s the event loop asks itself, `LoopUpstreamPool`), with the
/// upstream's two timeouts kept apart (DESIGN.md, Timeouts):
/// - the answer deadline (`timeouts.upstream`) runs from the moment the
///   request, body included, has been handed over, to the response head: a
///   push that takes minutes to send is never cut for taking long;
/// - the idle timeout (`timeouts.upstream_idle`) runs between reads of the
///   response body (`UpstreamBody`).
///
/// Redirects are never followed by the client itself: a blob fill follows
/// them by hand (`getBlob`), a pass-through hands them to the
/// client unchanged.
///
/// Each upstream's TLS settings (`ca_file`, client certificate, `insecure`)
/// and its credentials go with every request sent `to:` it (`send`).
///
/// Two HTTP clients, so two connection pools per upstream host (`Pool`):
/// blob downloads in one, everything else in the other. A download holds
/// its connection as long as the upstream trickles, and no number of them
/// may delay a `/v2/` ping, a manifest, a token or an access check.
public final class UpstreamClient: Sendable {
    /// Which connection pool a request uses.
    enum Pool: Sendable {
        /// The `/v2/` ping, manifests, tags, tokens, access-check `HEAD`s,
        /// uploads: short exchanges a pull waits on.
        case control
        /// Fills: long downloads, bounded per upstream by `max_fills`
        /// (`FillSlots`), so this pool never needs more than their sum.
        case fills
    }

    /// A TLS upstream's context for the event loops' own connections
    /// (`LoopUpstreamPool`), made with its session from the same settings,
    /// so both sides trust the same roots (read once, at start or reload,
    /// off the loops). `number` tells connections made with one context
    /// from those of another.
    struct LoopTLS: Sendable {
        let context: NIOSSLContext
        let number: Int
    }

    /// What is particular to one upstream.
    struct Session: Sendable {
        let tls: TLSConfiguration?
        /// Nil for plaintext, or when no context could be made (the async
        /// side then asks, and says why).
        let loopTLS: LoopTLS?
        let auth: UpstreamAuth?
        /// The settings it was made from: a reload keeps a session (and
        /// the tokens its account holds) when they did not change.
        let upstream: ProxyConfig.Upstream
    }

    /// What a reload may change.
    private struct Live {
        var sessions: [String: Session]
        var answerTimeout: Duration
        var idleTimeout: Duration
    }

    let http: HTTPClient
    private let fillHTTP: HTTPClient
    /// Where a fill's own connection (`FillDownload`) is made.
    private let group: any EventLoopGroup
    /// Upstreams (by `host`) that answered a blob's first request with a
    /// redirect: their fills go through AsyncHTTPClient's kept-alive
    /// connections (`ownConnection`).
    private let redirecting = NIOLockedValueBox<Set<String>>([])
    private let live: NIOLockedValueBox<Live>
    /// Where redirect targets lead (`AddressScope`).
    let resolver: any HostResolver
    var answerTimeout: Duration { live.withLockedValue { $0.answerTimeout } }
    var idleTimeout: Duration { live.withLockedValue { $0.idleTimeout } }
    /// Also bounds the name look-up of a redirect's target.
    let connectTimeout: Duration
    /// Where the detail of upstream failures goes (clients get a summary).
    let logger: Logger

    public init(eventLoopGroup: any EventLoopGroup, timeouts: ProxyConfig.Timeouts,
                upstreams: [ProxyConfig.Upstream] = [], resolver: any HostResolver = SystemResolver(),
                logger: Logger) throws {
        self.logger = logger
        self.resolver = resolver
        self.group = eventLoopGroup
        let sessions = try Self.sessions(for: upstreams, keeping: [:])
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        configuration.decompression = .disabled
        // AsyncHTTPClient's read timeout runs from the request's end to each
        // read, the answer wait and the idle wait in one, and keeps running
        // while the proxy pushes back on it for a slow client. Both waits are
        // timed here instead, each with its own limit.
        configuration.timeout = .init(connect: .fromSeconds(timeouts.connectSeconds), read: nil)
        configuration.connectionPool.idleTimeout = .seconds(60)
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 64
        self.http = HTTPClient(eventLoopGroupProvider: .shared(eventLoopGroup), configuration: configuration)
        // Upstreams may share a registry host, and redirects of all of them
        // may share a CDN host: the fills' pool may hold every fill at once.
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit =
            max(1, upstreams.reduce(0) { $0 + $1.maxFills })
        self.fillHTTP = HTTPClient(eventLoopGroupProvider: .shared(eventLoopGroup), configuration: configuration)
        self.live = NIOLockedValueBox(Live(sessions: sessions,
                                           answerTimeout: .milliseconds(Int64(timeouts.upstreamSeconds * 1000)),
                                           idleTimeout: .milliseconds(Int64(timeouts.upstreamIdleSeconds * 1000))))
        self.connectTimeout = .milliseconds(Int64(timeouts.connectSeconds * 1000))
    }

    /// `loop`: whether to make the event loops' TLS contexts too (not for
    /// a session made afresh for one request, which the loops never see).
    private static func sessions(for upstreams: [ProxyConfig.Upstream], keeping old: [String: Session],
                                 loop: Bool = true) throws -> [String: Session] {
        var sessions: [String: Session] = [:]
        for (index, upstream) in upstreams.enumerated() {
            if let kept = old[upstream.host], kept.upstream == upstream {
                sessions[upstream.host] = kept
                continue
            }
            let tls = try Self.tlsConfiguration(upstream.tls, key: "upstreams[\(index)]")
            sessions[upstream.host] = Session(
                tls: tls,
                loopTLS: loop && upstream.schema == "https" && LoopUpstreamPool.serves(upstream) ? Self.loopTLS(tls) : nil,
                auth: upstream.credentials.map { UpstreamAuth(credentials: $0, upstream: upstream) },
                upstream: upstream)
        }
        return sessions
    }

    /// The session of `upstream` as the request was routed: after a reload
    /// that changed or removed it, a request routed before (a fill waiting
    /// for a slot, an access check under way) still goes with the
    /// credentials and TLS settings of the upstream it is for, never with
    /// another registry's (made afresh, without the token cache).
    private func session(for upstream: ProxyConfig.Upstream) -> Session? {
        if let current = live.withLockedValue({ $0.sessions[upstream.host] }), current.upstream == upstream {
            return current
        }
        return try? Self.sessions(for: [upstream], keeping: [:], loop: false)[upstream.host]
    }

    /// The context the event loop's connections to `upstream` use: the one
    /// of its session in force, only while that session was made from the
    /// same settings (a request routed before a reload goes the async way).
    /// Never made here: this runs on the event loop.
    func loopTLS(for upstream: ProxyConfig.Upstream) -> LoopTLS? {
        guard let current = live.withLockedValue({ $0.sessions[upstream.host] }), current.upstream == upstream
        else { return nil }
        return current.loopTLS
    }

    /// Upstreams with the system's trust roots share one context (parsing
    /// the system's bundle takes milliseconds and hundreds of KiB each).
    private static let systemLoopTLS: LoopTLS? = makeLoopTLS(.makeClientConfiguration())
    private static let loopTLSNumbers = NIOLockedValueBox(0)

    private static func loopTLS(_ configuration: TLSConfiguration?) -> LoopTLS? {
        guard let configuration else { return systemLoopTLS }
        return makeLoopTLS(configuration)
    }

    private static func makeLoopTLS(_ configuration: TLSConfiguration) -> LoopTLS? {
        guard let context = try? NIOSSLContext(configuration: configuration) else { return nil }
        return LoopTLS(context: context, number: loopTLSNumbers.withLockedValue { $0 += 1; return $0 })
    }

    /// A reload: sessions for the upstreams configured now (unchanged ones
    /// kept, with their tokens), and the answer and idle timeouts. Requests
    /// already sent keep what they started with. Throws, changing nothing,
    /// when an upstream's TLS files cannot be read.
    func update(upstreams: [ProxyConfig.Upstream], timeouts: ProxyConfig.Timeouts) throws {
        let old = live.withLockedValue { $0.sessions }
        let sessions = try Self.sessions(for: upstreams, keeping: old)
        live.withLockedValue {
            $0.sessions = sessions
            $0.answerTimeout = .milliseconds(Int64(timeouts.upstreamSeconds * 1000))
            $0.idleTimeout = .milliseconds(Int64(timeouts.upstreamIdleSeconds * 1000))
        }
    }

    /// Sends a request; returns once the response head is in. `body`, when
    /// given, is streamed; the answer deadline starts when it has been
    /// handed over whole. While it is being sent, an upstream that stops
    /// taking it for the idle timeout is given up too (a client that is slow
    /// to send is the request-body timeout's business, not this one's).
    func execute(_ request: HTTPClientRequest, body: RequestBodySource? = nil,
                 pool: Pool = .control) async throws -> HTTPClientResponse {
        var request = request
        let upload = UploadProgress()
        if let body {
            request.body = .stream(body.reporting(to: upload), length: body.length)
        } else {
            upload.ended()
        }
        let http = pool == .fills ? fillHTTP : self.http
        let (answer, idle, ready) = (self.answerTimeout, self.idleTimeout, request)
        return try await withThrowingTaskGroup(of: HTTPClientResponse?.self) { group in
            group.addTask { try await http.execute(ready, deadline: .distantFuture) }
            group.addTask {
                try await upload.watch(answer: answer, idle: idle)
                return nil
            }
            defer { group.cancelAll() }
            while let response = try await group.next() {
                guard let response else { continue }
                guard response.status.code >= 200 else { throw UpstreamFailure.interim }
                return response
            }
            throw UpstreamFailure.answer
        }
    }

    /// Sends a request on behalf of `upstream`: with its TLS settings when
    /// the request goes to the upstream's host, and, for a read (`GET`,
    /// `HEAD`) whose client sent no `Authorization`, with the upstream
    /// account's credentials when one is configured (answering one 401
    /// challenge). The account never writes: a push, a delete or a mount by
    /// an anonymous client stays the upstream's 401.
    func send(_ request: HTTPClientRequest, to upstream: ProxyConfig.Upstream, body: RequestBodySource? = nil,
              authorize: Bool = true, pool: Pool = .control) async throws -> HTTPClientResponse {
        var request = request
        let session = session(for: upstream)
        if let target = RedirectTarget(request.url), target.host == upstream.registry {
            request.tlsConfiguration = session?.tls
        }
        guard authorize, let auth = session?.auth, request.method == .GET || request.method == .HEAD,
              !request.headers.contains(name: "authorization") else {
            return try await execute(request, body: body, pool: pool)
        }
        let known = auth.known(scope: UpstreamAuth.scope(method: request.method, url: request.url))
        if let known { request.headers.add(name: "authorization", value: known) }
        var response = try await execute(request, body: body, pool: pool)
        if response.status == .unauthorized, body == nil {
            let challenges = AuthChallenge.parse(response.headers["www-authenticate"].joined(separator: ", "))
            if let value = await auth.answer(challenges, refused: known, using: self) {
                // Read (bounded) so the connection can carry the retry.
                _ = try? await UpstreamBody.collect(response.body, limit: 1 << 16, idle: idleTimeout,
                                                    total: answerTimeout)
                request.headers.replaceOrAdd(name: "authorization", value: value)
                response = try await execute(request, pool: pool)
            }
        }
        // A session the upstream opens for the account is not the client's.
        response.headers.remove(name: "set-cookie")
        return response
    }

    /// The TLS settings of an upstream that has any; nil for the system's
    /// defaults. Unreadable or invalid PEM stops the start, naming the key.
    static func tlsConfiguration(_ tls: ProxyConfig.UpstreamTLS, key: String) throws -> TLSConfiguration? {
        guard tls.caFile != nil || tls.clientCert != nil || tls.insecure else { return nil }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        if let caFile = tls.caFile {
            do {
                configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile))
            } catch {
                throw ConfigError(key: key + ".ca_file", problem: "not a PEM certificate file (\(error))")
            }
        }
        if let certFile = tls.clientCert, let keyFile = tls.clientKey {
            do {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certFile).map { .certificate($0) }
            } catch {
                throw ConfigError(key: key + ".client_cert", problem: "not a PEM certificate file (\(error))")
            }
            do {
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            } catch {
                throw ConfigError(key: key + ".client_key", problem: "not a PEM private key file")
            }
        }
        if tls.insecure { configuration.certificateVerification = .none }
        return configuration
    }

    /// A blob's upstream answer, and whether it is the upstream's own yes
    /// to the client that asked (`AccessGate`'s terms for a `HEAD`): a 200
    /// from the upstream itself, or a redirect from it to blob storage that
    /// names the digest. A 200 from wherever a redirect led (a login page
    /// behind an SSO front, say) says nothing about access.
    struct BlobAnswer {
        let response: HTTPClientResponse
        let vouches: Bool
    }

    /// The answers `getBlob` follows (with a `Location`).
    private static let redirects: Set<UInt> = [301, 302, 303, 307, 308]

    /// A GET of a blob that follows up to `limit` redirects, on the fills'
    /// pool. `Authorization` and cookies go only where the original request
    /// went: a redirect that changes scheme, host or port (a CDN with a
    /// signed URL, say) gets none. Only http and https are followed, and
    /// only to addresses `AddressScope` allows for this upstream.
    /// `ownConnection`: the first request may go on a connection of its
    /// own (`FillDownload`): for a blob, whose body is long.
    func getBlob(url: String, headers: HTTPHeaders, upstream: ProxyConfig.Upstream, digest: Digest,
                 ownConnection: Bool = false, limit: Int = 5) async throws -> BlobAnswer {
        var current = url
        var headers = headers
        var vouches = true
        guard let original = RedirectTarget(url) else { throw UpstreamFailure.badRedirect }
        for hop in 0...limit {
            let response: HTTPClientResponse
            if hop == 0, ownConnection, let own = self.ownConnection(for: url, upstream: upstream) {
                response = try await FillDownload.get(path: own.path, headers: headers, upstream: upstream,
                                                      tls: own.tls, on: group.next(),
                                                      connectTimeout: TimeAmount(connectTimeout),
                                                      answerTimeout: TimeAmount(answerTimeout))
                guard response.status.code >= 200 else { throw UpstreamFailure.interim }
                if Self.redirects.contains(response.status.code) {
                    redirecting.withLockedValue { _ = $0.insert(upstream.host) }
                }
            } else {
                var request = HTTPClientRequest(url: current)
                request.method = .GET
                request.headers = headers
                // The upstream's own credentials go to the upstream only,
                // never to where it redirects.
                response = try await send(request, to: upstream, authorize: current == url, pool: .fills)
            }
            guard Self.redirects.contains(response.status.code),
                  let location = response.headers.first(name: "location")
            else { return BlobAnswer(response: response, vouches: vouches && response.status == .ok) }
            if hop == 0 { vouches = AccessGate.isBlobRedirect(location, digest: digest) }
            guard let next = RedirectTarget(location, relativeTo: current) else { throw UpstreamFailure.badRedirect }
            guard await mayFollow(next, from: upstream) else {
                logger.warning("redirect to an inner address refused", metadata: [
                    "upstream": "\(upstream.host)", "target": "\(next.host)"])
                throw UpstreamFailure.innerRedirect
            }
            if !next.sameOrigin(as: original) {
                headers.remove(name: "authorization")
                headers.remove(name: "cookie")
            }
            current = next.url
        }
        throw UpstreamFailure.tooManyRedirects
    }

    /// The path and TLS context for a fill's first request on a connection
    /// of its own (`FillDownload`), when the event loops can reach the
    /// upstream themselves: plaintext or TLS with the session in force, and
    /// no account of the proxy's (whose token exchange is `send`'s). Nil
    /// sends it through AsyncHTTPClient, as every redirect it leads to, and
    /// every request to an upstream that redirected one before: the body
    /// comes from elsewhere, and the first answer is short.
    func ownConnection(for url: String, upstream: ProxyConfig.Upstream) -> (path: String, tls: NIOSSLContext?)? {
        let origin = upstream.origin
        guard LoopUpstreamPool.serves(upstream), url.hasPrefix(origin + "/"),
              !redirecting.withLockedValue({ $0.contains(upstream.host) }) else { return nil }
        let path = String(url.dropFirst(origin.count))
        guard upstream.schema == "https" else { return (path, nil) }
        guard let context = loopTLS(for: upstream)?.context else { return nil }
        return (path, context)
    }

    /// Whether a redirect of `upstream` may lead to `target` (`AddressScope`).
    /// A name that does not resolve here, or not within the connect
    /// timeout, is refused: the connection would resolve it again and could
    /// get another answer.
    func mayFollow(_ target: RedirectTarget, from upstream: ProxyConfig.Upstream) async -> Bool {
        let targets = Set(await resolve(target.host).map(AddressScope.init(bytes:)))
        guard !targets.isEmpty else { return false }
        guard targets.contains(where: { $0 != .publicNetwork }) else { return true }
        let own = Set(await resolve(upstream.registry).map(AddressScope.init(bytes:)))
        return AddressScope.redirectAllowed(to: targets, from: own)
    }

    /// The host's addresses, or none after `connectTimeout`. Not a task
    /// group: a group waits for all its children, and a `getaddrinfo` that
    /// has started cannot be cancelled. The look-up runs on; its answer is
    /// dropped.
    private func resolve(_ host: String) async -> [[UInt8]] {
        let (resolver, limit) = (self.resolver, self.connectTimeout)
        let answer = NIOLockedValueBox<CheckedContinuation<[[UInt8]], Never>?>(nil)
        let finish: @Sendable ([[UInt8]]) -> Void = { addresses in
            answer.withLockedValue { continuation in
                continuation?.resume(returning: addresses)
                continuation = nil
            }
        }
        var tasks: [Task<Void, Never>] = []
        defer { for task in tasks { task.cancel() } }
        return await withCheckedContinuation { continuation in
            answer.withLockedValue { $0 = continuation }
            tasks.append(Task { finish(await resolver.addresses(of: host)) })
            tasks.append(Task {
                try? await Task.sleep(for: limit)
                finish([])
            })
        }
    }

    /// Shuts both clients down, the second even when the first fails (each
    /// must be shut down before it is released).
    public func shutdown() async throws {
        var failure: (any Error)?
        do { try await http.shutdown() } catch { failure = error }
        try await fillHTTP.shutdown()
        if let failure { throw failure }
    }

    /// Maps a failure to reach the upstream to the answer the client gets:
    /// no answer in time ─► 504, anything else (refused, reset, TLS) ─► 502.
    /// The message says what failed in the client's terms; the detail (host
    /// names, library errors) goes to the log only.
    public static func clientError(for error: any Error) -> OCIError {
        if let oci = error as? OCIError { return oci }
        switch error {
        case UpstreamFailure.answer, UpstreamFailure.idle, UpstreamExchangeStateMachine.Failure.timedOut:
            return OCIError(.gatewayTimeout, .timeout, "the upstream registry did not answer in time")
        case UpstreamFailure.tooManyRedirects:
            return OCIError(.badGateway, .unavailable, "the upstream registry redirected too many times")
        case UpstreamFailure.badRedirect, UpstreamFailure.innerRedirect:
            return OCIError(.badGateway, .unavailable, "the upstream registry redirected to an address the proxy does not follow")
        case UpstreamFailure.busy:
            return OCIError(.serviceUnavailable, .unavailable, "too many downloads from this upstream registry; retry shortly")
        case UpstreamFailure.interim:
            return OCIError(.badGateway, .unavailable, "the upstream registry answered with an interim status, not an answer")
        default:
            break
        }
        // A connect timeout is an upstream that cannot be reached: 502.
        if let http = error as? HTTPClientError, http == .readTimeout || http == .deadlineExceeded {
            return OCIError(.gatewayTimeout, .timeout, "the upstream registry did not answer in time")
        }
        return OCIError(.badGateway, .unavailable, "the upstream registry could not be reached")
    }
}

extension ProxyMetrics {
    /// Counts one upstream exchange: `response` nil when none came. The
    /// one place that reads an upstream's `ratelimit-remaining`.
    func upstreamAnswered(_ upstream: ProxyConfig.Upstream, method: HTTPMethod, response: HTTPClientResponse?) {
        upstreamAnswered(upstream, method: method, status: response?.status,
                         rateLimit: response?.headers.first(name: "ratelimit-remaining"))
    }

    /// The same, for an answer read by the event loop's own client
    /// (`LoopUpstreamPool`); `rateLimit`: its `ratelimit-remaining` value.
    func upstreamAnswered(_ upstream: ProxyConfig.Upstream, method: HTTPMethod, status: HTTPResponseStatus?,
                          rateLimit: String?) {
        upstreamResponse(upstream: upstream.host, method: method.rawValue, code: Int(status?.code ?? 0),
                         rateLimitRemaining: rateLimit.flatMap { UpstreamClient.rateLimitRemaining($0) })
    }
}

extension UpstreamClient {
    /// The count in a `ratelimit-remaining` header (Docker Hub writes
    /// `100;w=21600`: the pulls left, then the window in seconds).
    static func rateLimitRemaining(_ value: String) -> Int? {
        let count = String(value.prefix { $0 != ";" }.filter { !$0.isWhitespace })
        return Int(count).flatMap { $0 >= 0 ? $0 : nil }
    }
}

/// Why the proxy itself gave up an upstream exchange: a timeout, or a
/// redirect it will not follow.
enum UpstreamFailure: Error, Equatable {
    /// No response head within `timeouts.upstream` of the request's end.
    case answer
    /// No body bytes for `timeouts.upstream_idle`.
    case idle
    case tooManyRedirects
    case badRedirect
    /// A redirect to a loopback, link-local or private address of a scope
    /// the upstream itself is not in (`AddressScope`).
    case innerRedirect
    /// No download slot for this upstream (`FillSlots`): 503.
    case busy
    /// A 1xx status as the answer: NIO's decoders drop interim answers
    /// but pass a `101 Switching Protocols` on as the final one, and a
    /// client given a 101 to its `GET` would wait for a protocol that
    /// never comes.
    case interim
}

/// A redirect target the proxy is willing to follow: http or https only,
/// resolved against the URL that redirected.
struct RedirectTarget {
    let url: String
    let scheme: String
    let host: String
    let port: Int

    init?(_ location: String, relativeTo base: String? = nil) {
        var text = location
        // Absolute when it starts with a scheme; `/x?next=https://…` is not.
        let schemeEnd = location.firstIndex(where: { $0 == ":" || $0 == "/" || $0 == "?" || $0 == "#" })
        let isAbsolute = schemeEnd.map { location[$0] == ":" && $0 != location.startIndex } ?? false
        if let base, !isAbsolute {
            guard let baseTarget = RedirectTarget(base) else { return nil }
            let origin = "\(baseTarget.scheme)://\(baseTarget.authority)"
            if location.hasPrefix("//") {
                text = baseTarget.scheme + ":" + location
            } else if location.hasPrefix("/") {
                text = origin + location
            } else {
                return nil
            }
        }
        let lower = text.lowercased()
        let scheme: String
        if lower.hasPrefix("https://") { scheme = "https" } else if lower.hasPrefix("http://") { scheme = "http" } else { return nil }
        let rest = text.dropFirst(scheme.count + 3)
        let end = rest.firstIndex(where: { $0 == "/" || $0 == "?" || $0 == "#" }) ?? rest.endIndex
        let authority = rest[..<end]
        // `@` (userinfo) and `%` (an IPv6 zone, or an escape the resolver
        // and the connection might read apart) are refused.
        guard !authority.isEmpty, !authority.contains("@"), !authority.contains("%"),
              text.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f }) else { return nil }
        var host = Substring(authority.lowercased())
        var port = scheme == "https" ? 443 : 80
        if let colon = host.lastIndex(of: ":"), !host.hasSuffix("]") {
            guard let number = Int(host[host.index(after: colon)...]), (1...65535).contains(number) else { return nil }
            port = number
            host = host[..<colon]
        }
        self.url = text
        self.scheme = scheme
        self.host = String(host)
        self.port = port
    }

    var authority: String {
        let defaultPort = scheme == "https" ? 443 : 80
        return port == defaultPort ? host : "\(host):\(port)"
    }

    func sameOrigin(as other: RedirectTarget) -> Bool {
        scheme == other.scheme && host == other.host && port == other.port
    }
}

/// How far a request body has got to the upstream, for the two waits of an
/// upstream request before its answer: the upstream taking the body, then
/// the upstream answering.
final class UploadProgress: Sendable {
    private struct State {
        /// When a chunk was handed to AsyncHTTPClient that it has not come
        /// back for the next one since: the upstream is not taking bytes.
        var handedAt: ContinuousClock.Instant?
        /// When the body ended (at once for a request without one).
        var endedAt: ContinuousClock.Instant?
    }

    private let state = NIOLockedValueBox(State())

    func handed() { state.withLockedValue { $0.handedAt = .now } }
    func pulled() { state.withLockedValue { $0.handedAt = nil } }
    func ended() { state.withLockedValue { $0.endedAt = $0.endedAt ?? .now; $0.handedAt = nil } }

    /// Throws when the upstream has not answered within `answer` of the
    /// body's end, or has not taken a chunk for `idle`; looks every quarter
    /// of the shorter limit, so either is noticed within 1¼ × its value.
    /// Returns never otherwise (the request's task cancels it).
    func watch(answer: Duration, idle: Duration) async throws {
        let step = min(answer, idle) / 4
        while true {
            try await Task.sleep(for: step)
            let (handedAt, endedAt) = state.withLockedValue { ($0.handedAt, $0.endedAt) }
            let now = ContinuousClock.now
            if let endedAt, now - endedAt >= answer { throw UpstreamFailure.answer }
            if let handedAt, now - handedAt >= idle { throw UpstreamFailure.idle }
        }
    }
}
