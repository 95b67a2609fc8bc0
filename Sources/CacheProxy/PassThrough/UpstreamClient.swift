import AsyncHTTPClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// The one HTTP client every upstream request goes through, with the
/// upstream's two timeouts kept apart (DESIGN.md, Timeouts):
/// - the answer deadline (`timeouts.upstream`) runs from the moment the
///   request, body included, has been handed over, to the response head: a
///   push that takes minutes to send is never cut for taking long;
/// - the idle timeout (`timeouts.upstream_idle`) runs between reads of the
///   response body (`UpstreamBody`).
///
/// Redirects are never followed by the client itself: a blob fill follows
/// them by hand (`getFollowingRedirects`), a pass-through hands them to the
/// client unchanged.
public final class UpstreamClient: Sendable {
    let http: HTTPClient
    let answerTimeout: Duration
    let idleTimeout: Duration
    /// Where the detail of upstream failures goes (clients get a summary).
    let logger: Logger

    public init(eventLoopGroup: any EventLoopGroup, timeouts: ProxyConfig.Timeouts, logger: Logger) {
        self.logger = logger
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        configuration.decompression = .disabled
        // AsyncHTTPClient's read timeout runs from the request's end to each
        // read: the answer wait and the idle wait in one. Both are enforced
        // here, each with its own limit; the client's own is only a backstop.
        configuration.timeout = .init(
            connect: .fromSeconds(timeouts.connectSeconds),
            read: .fromSeconds(max(timeouts.upstreamSeconds, timeouts.upstreamIdleSeconds) + 1))
        configuration.connectionPool.idleTimeout = .seconds(60)
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 64
        self.http = HTTPClient(eventLoopGroupProvider: .shared(eventLoopGroup), configuration: configuration)
        self.answerTimeout = .milliseconds(Int64(timeouts.upstreamSeconds * 1000))
        self.idleTimeout = .milliseconds(Int64(timeouts.upstreamIdleSeconds * 1000))
    }

    /// Sends a request; returns once the response head is in. `body`, when
    /// given, is streamed and starts the answer deadline when it has ended.
    func execute(_ request: HTTPClientRequest, body: RequestBodySource? = nil) async throws -> HTTPClientResponse {
        var request = request
        let sent = BodySent()
        if let body {
            request.body = .stream(body.signalling(sent), length: body.length)
        } else {
            sent.signal()
        }
        let (http, answerTimeout, ready) = (self.http, self.answerTimeout, request)
        return try await withThrowingTaskGroup(of: HTTPClientResponse?.self) { group in
            group.addTask { try await http.execute(ready, deadline: .distantFuture) }
            group.addTask {
                await sent.wait()
                try await Task.sleep(for: answerTimeout)
                throw UpstreamTimeout.answer
            }
            defer {
                group.cancelAll()
                sent.signal()  // an early answer: the deadline task must not wait for the body
            }
            while let response = try await group.next() {
                if let response { return response }
            }
            throw UpstreamTimeout.answer
        }
    }

    /// A GET that follows up to `limit` redirects. `Authorization` and
    /// cookies go only where the original request went: a redirect that
    /// changes scheme, host or port (a CDN with a signed URL, say) gets
    /// none. Only http and https are followed.
    public func getFollowingRedirects(url: String, headers: HTTPHeaders, limit: Int = 5) async throws -> HTTPClientResponse {
        var current = url
        var headers = headers
        guard let original = RedirectTarget(url) else { throw UpstreamTimeout.badRedirect }
        for _ in 0...limit {
            var request = HTTPClientRequest(url: current)
            request.method = .GET
            request.headers = headers
            let response = try await execute(request)
            guard [301, 302, 303, 307, 308].contains(response.status.code),
                  let location = response.headers.first(name: "location")
            else { return response }
            guard let next = RedirectTarget(location, relativeTo: current) else { throw UpstreamTimeout.badRedirect }
            if !next.sameOrigin(as: original) {
                headers.remove(name: "authorization")
                headers.remove(name: "cookie")
            }
            current = next.url
        }
        throw UpstreamTimeout.tooManyRedirects
    }

    public func shutdown() async throws {
        try await http.shutdown()
    }

    /// Maps a failure to reach the upstream to the answer the client gets:
    /// no answer in time ─► 504, anything else (refused, reset, TLS) ─► 502.
    /// The message says what failed in the client's terms; the detail (host
    /// names, library errors) goes to the log only.
    public static func clientError(for error: any Error) -> OCIError {
        if let oci = error as? OCIError { return oci }
        switch error {
        case UpstreamTimeout.answer, UpstreamTimeout.idle:
            return OCIError(.gatewayTimeout, .timeout, "the upstream registry did not answer in time")
        case UpstreamTimeout.tooManyRedirects:
            return OCIError(.badGateway, .unavailable, "the upstream registry redirected too many times")
        case UpstreamTimeout.badRedirect:
            return OCIError(.badGateway, .unavailable, "the upstream registry redirected to an address the proxy does not follow")
        default:
            break
        }
        if let http = error as? HTTPClientError,
           http == .connectTimeout || http == .readTimeout || http == .deadlineExceeded {
            return OCIError(.gatewayTimeout, .timeout, "the upstream registry did not answer in time")
        }
        return OCIError(.badGateway, .unavailable, "the upstream registry could not be reached")
    }
}

/// Why an upstream exchange was given up by the proxy itself.
enum UpstreamTimeout: Error, Equatable {
    /// No response head within `timeouts.upstream` of the request's end.
    case answer
    /// No body bytes for `timeouts.upstream_idle`.
    case idle
    case tooManyRedirects
    case badRedirect
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
        if let base, !location.contains("://") {
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
        guard !authority.isEmpty, !authority.contains("@"),
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

/// Fires once when a request body has been handed over completely (or at
/// once for a request without one): the start of the answer deadline.
final class BodySent: Sendable {
    private let state = NIOLockedValueBox<(done: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func signal() {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Void, Never>] in
            guard !state.done else { return [] }
            state.done = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func wait() async {
        await withCheckedContinuation { continuation in
            let done = state.withLockedValue { state -> Bool in
                if !state.done { state.waiters.append(continuation) }
                return state.done
            }
            if done { continuation.resume() }
        }
    }
}
