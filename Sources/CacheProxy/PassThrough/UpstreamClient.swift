import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1

/// The one HTTP client every upstream request goes through. Redirects are
/// never followed by the client itself: a blob fill follows them by hand so
/// that `Authorization` is never sent to another host, and a pass-through
/// hands them to the client unchanged.
public final class UpstreamClient: Sendable {
    let http: HTTPClient
    let headTimeout: TimeAmount

    public init(eventLoopGroup: any EventLoopGroup, timeouts: ProxyConfig.Timeouts) {
        var configuration = HTTPClient.Configuration()
        configuration.redirectConfiguration = .disallow
        configuration.decompression = .disabled
        configuration.timeout = .init(
            connect: .milliseconds(Int64(timeouts.connectSeconds * 1000)),
            read: .milliseconds(Int64(timeouts.upstreamSeconds * 1000)))
        configuration.connectionPool.idleTimeout = .seconds(60)
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = 64
        self.http = HTTPClient(eventLoopGroupProvider: .shared(eventLoopGroup), configuration: configuration)
        self.headTimeout = .milliseconds(Int64(timeouts.upstreamSeconds * 1000))
    }

    /// Sends a request; returns once the response head is in (or the upstream
    /// timeout passed). The body is streamed by the caller.
    public func execute(_ request: HTTPClientRequest) async throws -> HTTPClientResponse {
        try await http.execute(request, timeout: headTimeout)
    }

    /// A GET that follows up to `limit` redirects, dropping `Authorization`
    /// as soon as a redirect leaves the original host: a registry's blob
    /// redirect points at a CDN with a signed URL that must not see the
    /// client's registry credentials.
    public func getFollowingRedirects(url: String, headers: HTTPHeaders, limit: Int = 5) async throws -> HTTPClientResponse {
        var current = url
        var headers = headers
        let originalHost = URL(string: url)?.host?.lowercased()
        for _ in 0...limit {
            var request = HTTPClientRequest(url: current)
            request.method = .GET
            request.headers = headers
            let response = try await execute(request)
            guard [301, 302, 303, 307, 308].contains(response.status.code),
                  let location = response.headers.first(name: "location"),
                  let next = URL(string: location, relativeTo: URL(string: current))?.absoluteURL
            else { return response }
            if next.host?.lowercased() != originalHost {
                headers.remove(name: "authorization")
            }
            current = next.absoluteString
        }
        throw OCIError(.badGateway, .unavailable, "upstream redirected more than \(limit) times")
    }

    public func shutdown() async throws {
        try await http.shutdown()
    }

    /// Maps a failure to reach the upstream to the answer the client gets:
    /// no answer in time ─► 504, anything else (refused, reset, TLS) ─► 502.
    public static func clientError(for error: any Error) -> OCIError {
        if let oci = error as? OCIError { return oci }
        if let http = error as? HTTPClientError,
           http == .connectTimeout || http == .readTimeout || http == .deadlineExceeded {
            return OCIError(.gatewayTimeout, .timeout, "upstream did not answer in time")
        }
        return OCIError(.badGateway, .unavailable, "upstream unreachable: \(String(describing: error).prefix(200))")
    }
}
