import AsyncHTTPClient
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// The proxy's own account at one upstream (`username` with a password),
/// used for requests whose client sent no `Authorization`: a private
/// registry, or Docker Hub above its anonymous rate limit.
///
/// The upstream says which scheme it wants in its first 401. `Basic` is
/// then sent up front from there on; `Bearer` goes through the token dance
/// (the challenge's realm, with the account's Basic credentials, for the
/// challenge's service and scope), and the token is kept per scope until it
/// expires. However many clients ask at once, one token request per scope
/// is in flight.
///
/// Neither the password nor a token is ever logged or put in an error.
final class UpstreamAuth: Sendable {
    private struct Token {
        let value: String
        let expires: ContinuousClock.Instant
    }

    private struct State {
        /// The upstream asked for Basic: send it with every request.
        var basic = false
        var tokens: [String: Token] = [:]
        var fetching: [String: Task<String?, Never>] = [:]
    }

    private let state = NIOLockedValueBox(State())
    private let basicValue: String
    static let maxTokens = 4096
    /// The upstream's own origin: a realm on it may be plain http when the
    /// upstream is; a realm anywhere else must be https, so the password
    /// never crosses a network in clear to a host the operator did not name.
    private let upstream: ProxyConfig.Upstream

    init(credentials: ProxyConfig.Credentials, upstream: ProxyConfig.Upstream) {
        self.basicValue = "Basic " + Data("\(credentials.username):\(credentials.password)".utf8).base64EncodedString()
        self.upstream = upstream
    }

    /// What to send before any challenge: Basic once asked for it, or a
    /// token still valid for the request's scope.
    func known(scope: String?) -> String? {
        state.withLockedValue { state in
            if state.basic { return basicValue }
            guard let scope, let token = state.tokens[scope], token.expires > .now else { return nil }
            return "Bearer " + token.value
        }
    }

    /// The `Authorization` to retry with after a 401 carrying `challenges`,
    /// or nil when none of them can be met. `refused` is what the request
    /// carried: a token the upstream no longer takes (revoked, expired
    /// early) is dropped, so the retry fetches a new one.
    func answer(_ challenges: [AuthChallenge], refused: String?, using client: UpstreamClient) async -> String? {
        if let refused, refused.hasPrefix("Bearer ") {
            let token = String(refused.dropFirst("Bearer ".count))
            state.withLockedValue { state in
                for (scope, cached) in state.tokens where cached.value == token { state.tokens[scope] = nil }
            }
        }
        // Bearer first when both are offered: the password then goes only to
        // the token service, not with every request.
        guard let bearer = challenges.first(where: { $0.scheme == "bearer" }) else {
            guard challenges.contains(where: { $0.scheme == "basic" }) else { return nil }
            state.withLockedValue { $0.basic = true }
            return basicValue
        }
        state.withLockedValue { $0.basic = false }  // the upstream moved on to tokens
        guard let realm = bearer["realm"], let target = RedirectTarget(realm), realmAllowed(target) else {
            client.logger.warning("upstream token realm refused: the account is not sent there", metadata: [
                "upstream": "\(upstream.host)", "realm_host": "\(RedirectTarget(bearer["realm"] ?? "")?.host ?? "?")"])
            return nil
        }
        let scope = bearer["scope"] ?? ""
        let task: Task<String?, Never> = state.withLockedValue { state in
            if let token = state.tokens[scope], token.expires > .now {
                let value = token.value
                return Task { value }
            }
            if let running = state.fetching[scope] { return running }
            let task = Task { await self.fetchToken(realm: realm, service: bearer["service"], scope: scope, client: client) }
            state.fetching[scope] = task
            return task
        }
        return await task.value.map { "Bearer " + $0 }
    }

    /// Where the account's password may go: an https realm named by a
    /// verified upstream, or the upstream's own host. An upstream whose
    /// certificate is not verified (`insecure`) cannot name a realm
    /// elsewhere: anyone on the path could.
    private func realmAllowed(_ realm: RedirectTarget) -> Bool {
        if realm.host == upstream.registry { return realm.scheme == "https" || upstream.schema == "http" }
        return realm.scheme == "https" && upstream.schema == "https" && !upstream.tls.insecure
    }

    private func fetchToken(realm: String, service: String?, scope: String, client: UpstreamClient) async -> String? {
        defer { state.withLockedValue { _ = $0.fetching.removeValue(forKey: scope) } }
        var query: [String] = []
        if let service { query.append("service=" + Self.encode(service)) }
        if !scope.isEmpty { query.append("scope=" + Self.encode(scope)) }
        let url = realm + (query.isEmpty ? "" : (realm.contains("?") ? "&" : "?") + query.joined(separator: "&"))
        var request = HTTPClientRequest(url: url)
        request.headers.add(name: "authorization", value: basicValue)
        do {
            let response = try await client.send(request, to: upstream, authorize: false)
            let body = try await UpstreamBody.collect(response.body, limit: 1 << 20, idle: client.idleTimeout,
                                                      total: client.answerTimeout)
            guard response.status == .ok,
                  let json = try JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: Any],
                  let token = (json["token"] as? String) ?? (json["access_token"] as? String), !token.isEmpty
            else {
                client.logger.warning("upstream token request refused", metadata: [
                    "upstream": "\(upstream.host)", "status": "\(response.status.code)"])
                return nil
            }
            // The distribution spec's default lifetime is 60 s; a token is
            // dropped a little early so it is never sent just as it expires.
            // Clamped to a day: the number is the token service's to choose,
            // and a huge one must not overflow the clock.
            let seconds = min(max((json["expires_in"] as? Double) ?? 60, 0), 86400)
            let lifetime = max(0, seconds * 0.9 - 1)
            let now = ContinuousClock.now
            let expires = now + .milliseconds(Int64(lifetime * 1000))
            state.withLockedValue { state in
                // Scopes come from repository names clients choose: expired
                // tokens go, and the table stays bounded.
                if state.tokens.count >= Self.maxTokens {
                    state.tokens = state.tokens.filter { $0.value.expires > now }
                    if state.tokens.count >= Self.maxTokens { state.tokens.removeAll() }
                }
                state.tokens[scope] = Token(value: token, expires: expires)
            }
            return token
        } catch {
            client.logger.warning("upstream token request failed", metadata: [
                "upstream": "\(upstream.host)", "error": "\(type(of: error))"])
            return nil
        }
    }

    static func encode(_ value: String) -> String {
        var allowed = CharacterSet.alphanumerics
        allowed.insert(charactersIn: "-._~")
        return value.addingPercentEncoding(withAllowedCharacters: allowed) ?? ""
    }

    /// The scope a request to `url` needs, as registries name it in their challenges:
    /// `repository:<name>:pull` (or `pull,push` for writes), nil for
    /// requests outside a repository (`/v2/`, `/v2/_catalog`).
    static func scope(method: HTTPMethod, url: String) -> String? {
        guard let start = url.range(of: "/v2/") else { return nil }
        let path = url[start.lowerBound...].split(separator: "?", maxSplits: 1).first ?? ""
        let rest = path.dropFirst(4)
        for marker in ["/blobs/", "/manifests/", "/tags/", "/referrers/"] {
            if let range = rest.range(of: marker, options: .backwards) {
                let name = rest[..<range.lowerBound]
                guard !name.isEmpty else { return nil }
                let actions = method == .GET || method == .HEAD ? "pull" : "pull,push"
                return "repository:\(name):\(actions)"
            }
        }
        return nil
    }
}
