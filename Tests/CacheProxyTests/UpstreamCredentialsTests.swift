import CacheProxy
import Foundation
import NIOConcurrencyHelpers
import XCTest

/// The proxy's own account at an upstream, for clients that send none.
final class UpstreamCredentialsTests: XCTestCase {
    /// The real registry behind htpasswd, pulled through the proxy by an
    /// anonymous skopeo: the proxy answers the Basic challenge itself.
    func testAnonymousPullFromAnHtpasswdRegistryWithTheProxysAccount() async throws {
        let registry = try Registry(users: ["ci": "hunter2"])
        let image = try TestImage.make(layerSizes: [4096, 200_000])
        try image.push(to: "\(registry.address)/team/app:v1", credentials: "ci:hunter2")
        let secretFile = try makeTemporaryFolder("secret") + "/password"
        try "hunter2\n".write(toFile: secretFile, atomically: true, encoding: .utf8)
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(registry.port), schema: http,
                 username: ci, password_file: "\(secretFile)"}
            """)
        defer { Task { await proxy.stop() } }
        let destination = try makeTemporaryFolder("pulled")
        let (status, output) = try shell("skopeo", [
            "copy", "--src-tls-verify=false", "docker://127.0.0.1:\(proxy.port)/team/app:v1", "oci:\(destination):v1"])
        XCTAssertEqual(status, 0, output)
        for layer in image.layers {
            XCTAssertEqual(registry.blobGets(layer), 1)
            // Anonymous again: from the cache, checked with the proxy's account.
            let hit = try curl("\(proxy.base)/v2/team/app/blobs/\(layer)")
            XCTAssertEqual(hit.code, 200)
            XCTAssertEqual(TestImage.digest(hit.body), layer)
            XCTAssertEqual(registry.blobGets(layer), 1)
        }
        // A client with credentials of its own is not given the proxy's.
        let wrong = try curl("\(proxy.base)/v2/team/app/manifests/v1", ["-u", "ci:wrong"])
        XCTAssertEqual(wrong.code, 401)
    }

    /// The real registry in token mode: an anonymous skopeo pulls through
    /// the proxy, which runs the token dance with its own account.
    func testAnonymousPullFromATokenRegistryWithTheProxysAccount() async throws {
        let tokens = try await TokenServer(users: ["robot": ("t0ps3cret", ["team/app"])])
        defer { Task { await tokens.fake.stop() } }
        let registry = try Registry(tokens: tokens)
        let image = try TestImage.make(layerSizes: [4096, 200_000])
        try image.push(to: "\(registry.address)/team/app:v1", credentials: "robot:t0ps3cret")
        let pushTokens = tokens.issued
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(registry.port), schema: http,
                 username: robot, password: t0ps3cret}
            """)
        defer { Task { await proxy.stop() } }
        let destination = try makeTemporaryFolder("pulled")
        let (status, output) = try shell("skopeo", [
            "copy", "--src-tls-verify=false", "docker://127.0.0.1:\(proxy.port)/team/app:v1", "oci:\(destination):v1"])
        XCTAssertEqual(status, 0, output)
        for layer in image.layers { XCTAssertEqual(registry.blobGets(layer), 1) }
        // One token for the /v2/ check (no scope) and one for the repository.
        XCTAssertLessThanOrEqual(tokens.issued - pushTokens, 2)
    }

    /// Bearer upstream: many anonymous clients at once, one token request;
    /// later requests reuse the token until it expires.
    func testOneTokenRequestPerScopeHoweverManyClientsAsk() async throws {
        let tokens = NIOLockedValueBox(0)
        let account = "Basic " + Data("robot:s3cret-pass".utf8).base64EncodedString()
        let fake = try await FakeUpstream.bearer(
            challenge: #",service="fake",scope="repository:team/app:pull""#,
            token: { head in
                tokens.withLockedValue { $0 += 1 }
                guard head.headers.first(name: "authorization") == account,
                      head.uri.contains("scope=repository%3Ateam%2Fapp%3Apull"), head.uri.contains("service=fake")
                else { return .init(status: .unauthorized) }
                return .init(body: Array(#"{"token":"t0k3n","expires_in":300}"#.utf8), headDelay: .milliseconds(300))
            },
            accepts: { $0 == "Bearer t0k3n" },
            resource: { _ in .init(headers: ["content-type": "application/json"], body: Array(#"{"ok":true}"#.utf8)) })
        setenv("CACHE_PROXY_TEST_UPSTREAM_PASSWORD", "s3cret-pass", 1)
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(fake.port), schema: http,
                 username: robot, password_env: CACHE_PROXY_TEST_UPSTREAM_PASSWORD}
            """)
        defer { Task { await proxy.stop(); await fake.stop() } }
        let results = try curlAtOnce("\(proxy.base)/v2/team/app/tags/list", count: 12)
        XCTAssertEqual(results.map(\.code), Array(repeating: 200, count: 12))
        XCTAssertEqual(tokens.withLockedValue { $0 }, 1, "one token request for one scope")
        let before = fake.requests.count
        XCTAssertEqual(try curl("\(proxy.base)/v2/team/app/tags/list?n=1").code, 200)
        XCTAssertEqual(tokens.withLockedValue { $0 }, 1, "the token is reused")
        let sent = fake.requests.dropFirst(before)
        XCTAssertEqual(sent.map { $0.headers.first(name: "authorization") }, ["Bearer t0k3n"],
                       "sent up front once known: one request, no 401 first")
    }

    /// A token the upstream stops taking before it expires is dropped and
    /// a new one fetched, instead of being sent again until it expires.
    func testARevokedTokenIsReplaced() async throws {
        let issued = NIOLockedValueBox(0)
        let fake = try await FakeUpstream.bearer(
            challenge: #",scope="repository:a:pull""#,
            token: { _ in
                let n = issued.withLockedValue { $0 += 1; return $0 }
                return .init(body: Array(#"{"token":"t\#(n)","expires_in":3600}"#.utf8))
            },
            // Only the newest token is good.
            accepts: { $0 == "Bearer t\(issued.withLockedValue { $0 })" })
        let proxy = try await TestProxy(upstreamsYAML: Self.withAccount(fake.port))
        defer { Task { await proxy.stop(); await fake.stop() } }
        XCTAssertEqual(try curl("\(proxy.base)/v2/a/manifests/v1").code, 200)
        issued.withLockedValue { $0 += 1 }  // t1 revoked: only t2 (not yet issued) would do
        let after = try curl("\(proxy.base)/v2/a/manifests/v1")
        XCTAssertEqual(after.code, 200)
        XCTAssertEqual(issued.withLockedValue { $0 }, 3, "a new token was fetched")
    }

    /// Review finding: the proxy's account is for reading. An anonymous
    /// DELETE (or push) must not be answered with the account's credentials.
    func testTheAccountIsNeverUsedToWrite() async throws {
        let registry = try Registry(users: ["ci": "hunter2"])
        let image = try TestImage.make(layerSizes: [4096])
        try image.push(to: "\(registry.address)/team/app:v1", credentials: "ci:hunter2")
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(registry.port), schema: http, username: ci, password: hunter2}
            """)
        defer { Task { await proxy.stop() } }
        // The proxy has learnt the upstream wants Basic (a read).
        XCTAssertEqual(try curl("\(proxy.base)/v2/").code, 200)
        let deleted = try curl("\(proxy.base)/v2/team/app/manifests/\(image.manifest)", ["-X", "DELETE"])
        XCTAssertEqual(deleted.code, 401)
        let upload = try curl("\(proxy.base)/v2/team/app/blobs/uploads/", ["-X", "POST"])
        XCTAssertEqual(upload.code, 401)
        let still = try curl("http://\(registry.address)/v2/team/app/manifests/\(image.manifest)", [
            "-u", "ci:hunter2", "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        XCTAssertEqual(still.code, 200, "the manifest is still there")
    }

    /// Review finding: a token service's `expires_in` is input too.
    func testAHugeTokenLifetimeIsClamped() async throws {
        let fake = try await FakeUpstream.bearer(
            token: { _ in .init(body: Array(#"{"token":"t","expires_in":9223372036854775807}"#.utf8)) },
            accepts: { $0 == "Bearer t" })
        let proxy = try await TestProxy(upstreamsYAML: Self.withAccount(fake.port))
        defer { Task { await proxy.stop(); await fake.stop() } }
        XCTAssertEqual(try curl("\(proxy.base)/v2/a/manifests/v1").code, 200)
        XCTAssertEqual(try curl("\(proxy.base)/v2/a/manifests/v1").code, 200)
    }

    /// A token service that stalls, before its answer or inside its body,
    /// for longer than the upstream timeouts: the client gets the
    /// upstream's own 401 once they pass, and the next request, with the
    /// service well again, gets its token.
    func testAStalledTokenServiceEndsAtTheUpstreamTimeouts() async throws {
        let mode = NIOLockedValueBox("head")
        let token = Array(#"{"token":"t","expires_in":300}"#.utf8)
        let fake = try await FakeUpstream.bearer(
            token: { _ in
                switch mode.withLockedValue({ $0 }) {
                case "head": return .init(body: token, headDelay: .seconds(5))
                case "body": return .init(body: token, stallAfter: 5, stallFor: .seconds(5))
                default: return .init(body: token)
                }
            },
            accepts: { $0 == "Bearer t" })
        let proxy = try await TestProxy(upstreamsYAML: Self.withAccount(fake.port),
                                        extraYAML: "timeouts: {upstream: 1, upstream_idle: 1}")
        defer { Task { await proxy.stop(); await fake.stop() } }
        for stall in ["head", "body"] {
            mode.withLockedValue { $0 = stall }
            let started = ContinuousClock.now
            let answer = try curl("\(proxy.base)/v2/a/manifests/\(stall)")
            XCTAssertEqual(answer.code, 401, stall)
            XCTAssertLessThan(ContinuousClock.now - started, .seconds(3.5), "\(stall): bounded by the timeouts")
        }
        mode.withLockedValue { $0 = "well" }
        XCTAssertEqual(try curl("\(proxy.base)/v2/a/manifests/v1").code, 200)
    }

    static func withAccount(_ port: Int) -> String {
        "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(port), schema: http, username: u, password: p}"
    }

    func testPasswordsAreNeverPrinted() throws {
        let config = try ConfigLoader.parse(yaml: """
            api: {port: 5000}
            upstreams:
              - {host: a, registry: r.example, username: bob, password: "p@ss-word-123"}
            storage: {folder: /tmp/x}
            """)
        XCTAssertEqual(config.upstreams[0].credentials?.password, "p@ss-word-123")
        for text in [String(describing: config), String(reflecting: config), "\(config.upstreams[0])"] {
            XCTAssertFalse(text.contains("p@ss-word-123"), text)
        }
        var dumped = ""
        dump(config, to: &dumped)
        XCTAssertFalse(dumped.contains("p@ss-word-123"))
    }

    func testCredentialConfigErrorsNameTheKey() throws {
        let cases: [(String, String)] = [
            ("{host: a, registry: r, username: bob}", "upstreams[0].username"),
            ("{host: a, registry: r, password: x}", "upstreams[0].password"),
            ("{host: a, registry: r, username: bob, password: x, password_env: Y}", "upstreams[0].username"),
            ("{host: a, registry: r, username: bob, password_env: CACHE_PROXY_NOT_SET_ANYWHERE}", "upstreams[0].password_env"),
            ("{host: a, registry: r, username: bob, password_file: /nonexistent/secret}", "upstreams[0].password_file"),
            ("{host: a, registry: r, access_check: sometimes}", "upstreams[0].access_check"),
            ("{host: a, registry: r, offline: maybe}", "upstreams[0].offline"),
            ("{host: a, registry: r, client_cert: /etc/hostname}", "upstreams[0].client_key"),
            ("{host: a, registry: r, ca_file: /nonexistent.pem}", "upstreams[0].ca_file"),
        ]
        assertConfigErrors(cases.map { upstream, key in
            ("api: {port: 5000}\nupstreams:\n  - \(upstream)\nstorage: {folder: /tmp/x}\n", key)
        }, secret: "x,")
    }
}
