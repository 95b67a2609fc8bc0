import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// A cached blob goes only to a client the upstream would give it to
/// (DESIGN.md, Security): checked against the real registry behind
/// htpasswd, and against a bearer-token upstream.
final class AccessCheckTests: XCTestCase {
    /// A curl request through the proxy: status and response headers.
    private func request(_ url: String, host: String, _ extra: [String]) throws -> (code: Int, headers: String, body: Data) {
        let headerFile = NSTemporaryDirectory() + "headers-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: headerFile) }
        let result = try curl(url, ["-H", "Host: \(host)", "-D", headerFile] + extra)
        let headers = (try? String(contentsOfFile: headerFile, encoding: .utf8)) ?? ""
        return (result.code, headers.lowercased(), result.body)
    }

    private static func sha(_ data: Data) -> String { TestImage.digest(data) }

    /// Each stranger gets 401 with the upstream's `challenge` for GET, HEAD
    /// and Range, an OCI error body, and no byte of `blob`.
    private func assertRefused(_ url: String, host: String, strangers: [(String, [String])], challenge: String,
                               blob: Data, file: StaticString = #filePath, line: UInt = #line) throws {
        for (who, credentials) in strangers {
            for (what, extra) in [("GET", [String]()), ("HEAD", ["-I"]), ("Range", ["-H", "Range: bytes=0-99"])] {
                let answer = try request(url, host: host, credentials + extra)
                XCTAssertEqual(answer.code, 401, "\(who), \(what)", file: file, line: line)
                XCTAssertTrue(answer.headers.contains(challenge),
                              "\(who), \(what): the upstream's challenge is passed on: \(answer.headers)",
                              file: file, line: line)
                XCTAssertNotEqual(Self.sha(answer.body), Self.sha(blob), file: file, line: line)
                XCTAssertFalse(answer.body.count >= 100 && answer.body.prefix(100) == blob.prefix(100),
                               file: file, line: line)
                if what != "HEAD" {  // curl -I writes the head where a body would go
                    XCTAssertFalse(answer.body.count >= 100, "\(who), \(what): no blob bytes", file: file, line: line)
                    XCTAssertTrue(String(decoding: answer.body, as: UTF8.self).contains("UNAUTHORIZED"),
                                  file: file, line: line)
                }
            }
        }
    }

    func testHtpasswdRegistry_OnlyClientsTheRegistryAcceptsGetTheCachedBlob() async throws {
        let registry = try Registry(users: ["alice": "secret"])
        let image = try TestImage.make(layerSizes: [300_000])
        try image.push(to: "\(registry.address)/team/app:v1", credentials: "alice:secret")
        let other = try Registry()  // anonymous, and without the blob
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "private.test", registry: "127.0.0.1", port: \(registry.port), schema: http}
              - {host: "other.test", registry: "127.0.0.1", port: \(other.port), schema: http}
            """)
        defer { Task { await proxy.stop() } }
        let layer = image.layers[0]
        let url = "\(proxy.base)/v2/team/app/blobs/\(layer)"

        let filled = try request(url, host: "private.test", ["-u", "alice:secret"])
        XCTAssertEqual(filled.code, 200)
        XCTAssertEqual(Self.sha(filled.body), layer)
        XCTAssertEqual(registry.blobGets(layer), 1)

        let strangers: [(String, [String])] = [
            ("anonymous", []), ("wrong password", ["-u", "alice:wrong"]), ("unknown user", ["-u", "mallory:secret"]),
        ]
        try assertRefused(url, host: "private.test", strangers: strangers,
                          challenge: "www-authenticate: basic realm=\"test-realm\"", blob: filled.body)

        // The authorized client: from the cache, with no second GET upstream.
        let again = try request(url, host: "private.test", ["-u", "alice:secret"])
        XCTAssertEqual(again.code, 200)
        XCTAssertEqual(Self.sha(again.body), layer)
        let range = try request(url, host: "private.test", ["-u", "alice:secret", "-H", "Range: bytes=0-99"])
        XCTAssertEqual(range.code, 206)
        XCTAssertEqual(range.body.count, 100)
        XCTAssertEqual(registry.blobGets(layer), 1)

        // Through another Host, whose upstream does not have the blob: its 404.
        for extra in [[String](), ["-I"]] {
            let elsewhere = try request(url, host: "other.test", ["-u", "alice:secret"] + extra)
            XCTAssertEqual(elsewhere.code, 404)
            XCTAssertNotEqual(Self.sha(elsewhere.body), layer)
            if extra.isEmpty { XCTAssertTrue(String(decoding: elsewhere.body, as: UTF8.self).contains("BLOB_UNKNOWN")) }
        }
        XCTAssertEqual(other.blobGets(layer), 0)

        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_access_checks_total{result=\"refused\"}"), 11)
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_access_checks_total{result=\"remembered\"}"), 1)
    }

    /// The real registry in token mode (`auth: token`, ES256 JWTs from a
    /// token service with Docker Hub's behaviour): only a token whose
    /// `access` claim covers the repository gets the cached blob.
    func testTokenRegistry_OnlyATokenForTheRepositoryGetsTheCachedBlob() async throws {
        let tokens = try await TokenServer(users: ["alice": ("secret", ["team/app"]), "bob": ("builder", ["team/other"])])
        defer { Task { await tokens.fake.stop() } }
        let registry = try Registry(tokens: tokens)
        let image = try TestImage.make(layerSizes: [300_000])
        try image.push(to: "\(registry.address)/team/app:v1", credentials: "alice:secret")
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(registry.port))
        defer { Task { await proxy.stop() } }
        let layer = image.layers[0]
        let url = "\(proxy.base)/v2/team/app/blobs/\(layer)"
        let scope = "repository:team/app:pull"

        let alice = ["-H", "Authorization: Bearer " + (try tokens.token(user: "alice:secret", scope: scope))]
        let filled = try request(url, host: "127.0.0.1", alice)
        XCTAssertEqual(filled.code, 200)
        XCTAssertEqual(Self.sha(filled.body), layer)
        XCTAssertEqual(registry.blobGets(layer), 1)

        let strangers: [(String, [String])] = [
            ("anonymous", []),
            ("bogus token", ["-H", "Authorization: Bearer not.a.token"]),
            ("anonymous token", ["-H", "Authorization: Bearer " + (try tokens.token(user: nil, scope: scope))]),
            ("token of a user without access", ["-H", "Authorization: Bearer " + (try tokens.token(user: "bob:builder", scope: scope))]),
        ]
        try assertRefused(url, host: "127.0.0.1", strangers: strangers,
                          challenge: "www-authenticate: bearer realm=\"\(tokens.realm)\"", blob: filled.body)
        let again = try request(url, host: "127.0.0.1", alice + ["-H", "Range: bytes=0-99"])
        XCTAssertEqual(again.code, 206)
        XCTAssertEqual(again.body, filled.body.prefix(100))
        XCTAssertEqual(registry.blobGets(layer), 1, "from the cache")
    }

    /// Review finding: a yes for one digest must not open every digest
    /// under that repository name. Alice may pull only `alice/x`; a layer
    /// cached for `corp/secret` asked for as `alice/x/blobs/<it>` is the
    /// registry's 404, however fresh her grant for `alice/x` is.
    func testAGrantForARepositoryDoesNotOpenBlobsOfOtherRepositories() async throws {
        let tokens = try await TokenServer(users: ["alice": ("a", ["alice/x"]), "corp": ("c", ["corp/secret"])])
        defer { Task { await tokens.fake.stop() } }
        let registry = try Registry(tokens: tokens)
        let mine = try TestImage.make(layerSizes: [10_000])
        try mine.push(to: "\(registry.address)/alice/x:v1", credentials: "alice:a")
        let secret = try TestImage.make(layerSizes: [20_000])
        try secret.push(to: "\(registry.address)/corp/secret:v1", credentials: "corp:c")
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(registry.port))
        defer { Task { await proxy.stop() } }
        let corp = ["-H", "Authorization: Bearer " + (try tokens.token(user: "corp:c", scope: "repository:corp/secret:pull"))]
        XCTAssertEqual(try request("\(proxy.base)/v2/corp/secret/blobs/\(secret.layers[0])", host: "127.0.0.1", corp).code, 200)

        let alice = ["-H", "Authorization: Bearer " + (try tokens.token(user: "alice:a", scope: "repository:alice/x:pull"))]
        XCTAssertEqual(try request("\(proxy.base)/v2/alice/x/blobs/\(mine.layers[0])", host: "127.0.0.1", alice).code, 200)
        for extra in [[String](), ["-I"], ["-H", "Range: bytes=0-9"]] {
            let stolen = try request("\(proxy.base)/v2/alice/x/blobs/\(secret.layers[0])", host: "127.0.0.1", alice + extra)
            XCTAssertEqual(stolen.code, 404, "\(extra)")
            XCTAssertNotEqual(Self.sha(stolen.body), secret.layers[0])
        }
    }

    /// Review finding: an upstream with `access_check: never` must not hand
    /// out blobs that were cached through another upstream.
    func testANeverUpstreamDoesNotServeBlobsCachedThroughAnother() async throws {
        let tokens = try await TokenServer(users: ["corp": ("c", ["corp/secret"])])
        defer { Task { await tokens.fake.stop() } }
        let privateRegistry = try Registry(tokens: tokens)
        let secret = try TestImage.make(layerSizes: [20_000])
        try secret.push(to: "\(privateRegistry.address)/corp/secret:v1", credentials: "corp:c")
        let publicRegistry = try Registry()
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "private.test", registry: "127.0.0.1", port: \(privateRegistry.port), schema: http}
              - {host: "public.test", registry: "127.0.0.1", port: \(publicRegistry.port), schema: http, access_check: never}
            """)
        defer { Task { await proxy.stop() } }
        let corp = ["-H", "Authorization: Bearer " + (try tokens.token(user: "corp:c", scope: "repository:corp/secret:pull"))]
        let layer = secret.layers[0]
        XCTAssertEqual(try request("\(proxy.base)/v2/corp/secret/blobs/\(layer)", host: "private.test", corp).code, 200)
        for extra in [[String](), ["-I"]] {
            let stolen = try request("\(proxy.base)/v2/corp/secret/blobs/\(layer)", host: "public.test", extra)
            XCTAssertEqual(stolen.code, 404, "\(extra)")
            XCTAssertNotEqual(Self.sha(stolen.body), layer)
        }
        XCTAssertEqual(publicRegistry.blobGets(layer), 0)
    }

    /// A fake registry that wants `Bearer good-token`, and its token service.
    private final class BearerUpstream: Sendable {
        let fake: FakeUpstream
        let blob: [UInt8]
        let digest: String
        private let counts = NIOLockedValueBox<(tokens: Int, gets: Int)>((0, 0))
        var tokenRequests: Int { counts.withLockedValue { $0.tokens } }
        var blobGets: Int { counts.withLockedValue { $0.gets } }

        init(blob: [UInt8], account: String? = nil) async throws {
            self.blob = blob
            digest = AccessCheckTests.sha(Data(blob))
            let (counts, digest) = (self.counts, self.digest)
            fake = try await FakeUpstream.bearer(
                challenge: #",service="fake",scope="repository:team/app:pull""#,
                token: { head in
                    counts.withLockedValue { $0.tokens += 1 }
                    if let account {
                        let expected = "Basic " + Data(account.utf8).base64EncodedString()
                        guard head.headers.first(name: "authorization") == expected else {
                            return .init(status: .unauthorized)
                        }
                    }
                    return .init(headers: ["content-type": "application/json"],
                                 body: Array(#"{"token":"good-token","expires_in":300}"#.utf8),
                                 headDelay: .milliseconds(200))
                },
                accepts: { $0 == "Bearer good-token" },
                resource: { head in
                    if head.uri.contains("/manifests/") { return .init(body: Array("{}".utf8)) }
                    guard head.uri.hasSuffix(digest) else { return .init(status: .notFound) }
                    if head.method == .GET { counts.withLockedValue { $0.gets += 1 } }
                    return .init(headers: ["docker-content-digest": digest], body: blob)
                })
        }
    }

    func testBearerUpstream_ABogusTokenGetsTheChallengeNotTheBlob() async throws {
        let blob = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let upstream = try await BearerUpstream(blob: blob)
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.fake.port))
        defer { Task { await proxy.stop(); await upstream.fake.stop() } }
        let url = "\(proxy.base)/v2/team/app/blobs/\(upstream.digest)"
        let good = ["-H", "Authorization: Bearer good-token"]

        XCTAssertEqual(try request(url, host: "127.0.0.1", good).code, 200)
        XCTAssertEqual(upstream.blobGets, 1)
        for extra in [[String](), ["-I"], ["-H", "Range: bytes=5-9"]] {
            let answer = try request(url, host: "127.0.0.1", ["-H", "Authorization: Bearer bogus"] + extra)
            XCTAssertEqual(answer.code, 401, "\(extra)")
            XCTAssertTrue(answer.headers.contains("www-authenticate: bearer realm="), answer.headers)
            XCTAssertFalse(answer.body.count >= 5 && answer.body.starts(with: blob.prefix(5)))
        }
        let anonymous = try request(url, host: "127.0.0.1", [])
        XCTAssertEqual(anonymous.code, 401)
        let again = try request(url, host: "127.0.0.1", good)
        XCTAssertEqual(again.code, 200)
        XCTAssertEqual(Array(again.body), blob)
        XCTAssertEqual(upstream.blobGets, 1, "served from the cache")
        // The checks carried the client's credentials and nothing else of
        // its request (its Host, its Range).
        let checks = upstream.fake.requests.filter { $0.method == .HEAD }
        XCTAssertFalse(checks.isEmpty)
        for check in checks {
            XCTAssertEqual(check.headers.first(name: "host"), "127.0.0.1:\(upstream.fake.port)")
            XCTAssertFalse(check.headers.contains(name: "range"))
            XCTAssertEqual(check.uri, "/v2/team/app/blobs/\(upstream.digest)")
        }
    }

    /// A client joining a fill someone else started is checked too.
    func testJoiningAFillIsChecked() async throws {
        let blob = (0..<2_000_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let digest = Self.sha(Data(blob))
        let fake = try await FakeUpstream { head in
            guard head.headers.first(name: "authorization") == "Bearer good-token" else {
                return .init(status: .unauthorized, headers: ["www-authenticate": #"Bearer realm="https://auth.invalid/token""#])
            }
            // Slow enough that the second client arrives while it runs.
            return .init(body: blob, chunkSize: 100_000, delay: .milliseconds(50))
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(fake.port))
        defer { Task { await proxy.stop(); await fake.stop() } }
        let url = "\(proxy.base)/v2/team/app/blobs/\(digest)"
        async let leader = Task.detached { try curl(url, ["-H", "Authorization: Bearer good-token"]) }.value
        try await Task.sleep(for: .milliseconds(300))
        let intruder = try request(url, host: "127.0.0.1", ["-H", "Authorization: Bearer bogus"])
        XCTAssertEqual(intruder.code, 401)
        XCTAssertTrue(intruder.body.count < 1000)
        let first = try await leader
        XCTAssertEqual(first.code, 200)
        XCTAssertEqual(Self.sha(first.body), digest)
        XCTAssertEqual(fake.gets.count, 1)
    }

    /// Upstream unreachable: a triple allowed before is served (offline:
    /// serve, the default), a new one is refused; with offline: deny,
    /// nothing is.
    func testOfflinePolicy() async throws {
        let blob = (0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let upstream = try await BearerUpstream(blob: blob)
        let folder = try makeTemporaryFolder("cache")
        let url = { (proxy: TestProxy) in "\(proxy.base)/v2/team/app/blobs/\(upstream.digest)" }
        let good = ["-H", "Authorization: Bearer good-token"]
        let yaml = { (offline: String) in
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.fake.port), schema: http, access_cache_ttl: 0.2, offline: \(offline)}"
        }
        let timeouts = "timeouts: {connect: 1, upstream: 1}"
        let serving = try await TestProxy(upstreamsYAML: yaml("serve"), folder: folder, extraYAML: timeouts)
        XCTAssertEqual(try request(url(serving), host: "127.0.0.1", good).code, 200)
        await upstream.fake.stop()
        try await Task.sleep(for: .milliseconds(300))  // the yes is stale now
        let offline = try request(url(serving), host: "127.0.0.1", good)
        XCTAssertEqual(offline.code, 200)
        XCTAssertEqual(Array(offline.body), blob)
        let stranger = try request(url(serving), host: "127.0.0.1", ["-H", "Authorization: Bearer other"])
        // Refused connections are retried until `connect`; on a loaded
        // machine the answer deadline may end the check first: 502 or 504.
        XCTAssertTrue([502, 504].contains(stranger.code), "\(stranger.code)")
        XCTAssertTrue(String(decoding: stranger.body, as: UTF8.self).contains(#""code":"#))
        XCTAssertNotEqual(Array(stranger.body), blob)
        XCTAssertEqual(try serving.metric("cacheproxy_access_checks_total{result=\"offline_served\"}"), 1)
        XCTAssertEqual(try serving.metric("cacheproxy_access_checks_total{result=\"offline_refused\"}"), 1)
        await serving.stop()

        let denying = try await TestProxy(upstreamsYAML: yaml("deny"), folder: folder, extraYAML: timeouts)
        defer { Task { await denying.stop() } }
        let denied = try request(url(denying), host: "127.0.0.1", good)
        XCTAssertTrue([502, 504].contains(denied.code), "\(denied.code)")
        XCTAssertNotEqual(Array(denied.body), blob)
    }

    /// An upstream that takes the check's `HEAD` and never answers: the
    /// check ends at `timeouts.upstream`, like any upstream wait, and the
    /// offline policy decides (a stall, not a refusal).
    func testAStalledCheckEndsAtTheUpstreamTimeout() async throws {
        let blob = (0..<60_000).map { UInt8(truncatingIfNeeded: $0 &* 19) }
        let digest = Self.sha(Data(blob))
        let stall = NIOLockedValueBox(false)
        let fake = try await FakeUpstream { head in
            let delay: TimeAmount = stall.withLockedValue { $0 } ? .seconds(5) : .zero
            guard head.headers.first(name: "authorization") == "Bearer good-token" else {
                return .init(status: .unauthorized, headers: ["www-authenticate": #"Bearer realm="https://auth.invalid/t""#],
                             headDelay: delay)
            }
            return .init(body: blob, headDelay: delay)
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(fake.port), schema: http, access_cache_ttl: 0.2}",
            extraYAML: "timeouts: {upstream: 1}")
        defer { Task { await proxy.stop(); await fake.stop() } }
        let url = "\(proxy.base)/v2/team/app/blobs/\(digest)"
        XCTAssertEqual(try request(url, host: "127.0.0.1", ["-H", "Authorization: Bearer good-token"]).code, 200)
        stall.withLockedValue { $0 = true }
        try await Task.sleep(for: .milliseconds(300))  // the yes is stale: the next hit asks again

        var started = ContinuousClock.now
        let known = try request(url, host: "127.0.0.1", ["-H", "Authorization: Bearer good-token"])
        XCTAssertEqual(known.code, 200, "allowed before: served while the upstream stalls")
        XCTAssertEqual(Array(known.body), blob)
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(3))

        started = ContinuousClock.now
        let stranger = try request(url, host: "127.0.0.1", ["-H", "Authorization: Bearer other-token"])
        XCTAssertEqual(stranger.code, 504)
        XCTAssertNotEqual(Array(stranger.body), blob)
        let waited = ContinuousClock.now - started
        XCTAssertGreaterThanOrEqual(waited, .milliseconds(900), "the check waited for the upstream")
        XCTAssertLessThan(waited, .seconds(3), "and no longer than its timeout")
    }

    /// `access_check: never`: the reference design's behaviour, kept for
    /// public-only mirrors.
    func testAccessCheckNeverServesAnyone() async throws {
        let blob = (0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 17) }
        let upstream = try await BearerUpstream(blob: blob)
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.fake.port), schema: http, access_check: never}")
        defer { Task { await proxy.stop(); await upstream.fake.stop() } }
        let url = "\(proxy.base)/v2/team/app/blobs/\(upstream.digest)"
        XCTAssertEqual(try request(url, host: "127.0.0.1", ["-H", "Authorization: Bearer good-token"]).code, 200)
        XCTAssertEqual(try request(url, host: "127.0.0.1", []).code, 200)
        XCTAssertEqual(upstream.fake.requests.filter { $0.method == .HEAD }.count, 0)
    }
}

/// Which upstream redirects of an access check's HEAD count as a yes.
final class AccessRedirectTests: XCTestCase {
    func testOnlyRedirectsToTheBlobCountAsAYes() throws {
        let digest = try Digest(parsing: "sha256:" + String(repeating: "ab", count: 32))
        let hex = digest.hex
        XCTAssertTrue(AccessGate.isBlobRedirect("https://cdn.example/registry/v2/blobs/sha256/ab/\(hex)/data?sig=x", digest: digest))
        XCTAssertTrue(AccessGate.isBlobRedirect("/storage/\(hex)", digest: digest))
        XCTAssertFalse(AccessGate.isBlobRedirect("https://sso.example/login?next=/v2/a/blobs/sha256:\(hex)", digest: digest))
        XCTAssertFalse(AccessGate.isBlobRedirect("/login", digest: digest))
        XCTAssertFalse(AccessGate.isBlobRedirect(nil, digest: digest))
        // A redirector to another registry API answers for any repository.
        XCTAssertFalse(AccessGate.isBlobRedirect("https://mirror.example/v2/any/blobs/sha256:\(hex)", digest: digest))
        XCTAssertFalse(AccessGate.isBlobRedirect("/v2/other/blobs/sha256:\(hex)", digest: digest))
        XCTAssertFalse(AccessGate.isBlobRedirect("https://cdn.example/login#\(hex)", digest: digest))
    }
}

/// Review finding: a client whose joined fill was refused for another
/// client's credentials must not join the next fill that client starts.
final class RefusedJoinTests: XCTestCase {
    func testARefusedJoinerStartsItsOwnFillInsteadOfJoiningAnUnansweredOne() async throws {
        let blob = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 23) }
        let fake = try await FakeUpstream { _ in .init(body: blob, headDelay: .seconds(2)) }  // unanswered for 2 s
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(fake.port))
        defer { Task { await proxy.stop(); await fake.stop() } }
        let digest = try Digest(parsing: TestImage.digest(Data(blob)))
        let upstream = proxy.server.config.upstreams[0]
        let fills = proxy.server.fills
        guard case .fill(let first, joined: false) = fills.fill(for: digest, upstream: upstream, repository: "a",
                                                                  headers: ["authorization": "Bearer attacker"])
        else { return XCTFail("no fill started") }
        XCTAssertTrue(eventually { first.state == .requesting })
        // An ordinary newcomer joins it.
        guard case .fill(let joined, joined: true) = fills.fill(for: digest, upstream: upstream, repository: "a",
                                                                  headers: [:])
        else { return XCTFail("did not join") }
        XCTAssertTrue(joined === first)
        // One refused before does not: it gets a fill of its own, which
        // newcomers then join.
        guard case .fill(let own, joined: false) = fills.fill(for: digest, upstream: upstream, repository: "a",
                                                                headers: ["authorization": "Bearer victim"],
                                                                ownUnlessAnswered: true)
        else { return XCTFail("did not start its own") }
        XCTAssertFalse(own === first)
        guard case .fill(let next, joined: true) = fills.fill(for: digest, upstream: upstream, repository: "a",
                                                                headers: [:])
        else { return XCTFail("did not join") }
        XCTAssertTrue(next === own)
        // Both run to their end; the blob is published once or twice, whole.
        XCTAssertTrue(eventually(within: 8) { proxy.server.store.size(of: digest) == Int64(blob.count) })
        XCTAssertTrue(eventually { !fills.isBusy })
        XCTAssertEqual(Array(try curl("\(proxy.base)/v2/a/blobs/\(digest)").body), blob)
        XCTAssertEqual(proxy.files(in: "tmp"), [])
    }
}
