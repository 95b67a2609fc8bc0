import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// No client, and no upstream, may take from the others what they share:
/// the connections to an upstream, a fill of the same digest, the memory of
/// who may read what.
final class UpstreamIsolationTests: XCTestCase {
    typealias F = FaultInjectionTests

    /// Starts one curl per URL at once, each giving up after `seconds`, and
    /// waits for all of them (they abandon their downloads).
    private func abandon(_ urls: [String], host: String, after seconds: Double) throws {
        let started = try urls.map { url -> Process in
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try which("curl"))
            process.arguments = ["-s", "-o", "/dev/null", "--max-time", String(seconds), "-H", "Host: \(host)", url]
            try process.run()
            return process
        }
        for process in started { process.waitUntilExit() }
    }

    /// curl through the proxy with `Host: host`; returns the exchange and
    /// how long it took.
    private func timed(_ url: String, host: String, _ extra: [String] = []) throws
        -> (exit: Int32, body: Data, code: Int, seconds: Double) {
        let start = ContinuousClock.now
        let result = try curl(url, ["-H", "Host: \(host)", "--max-time", "5"] + extra)
        let elapsed = ContinuousClock.now - start
        return (result.exit, result.body, result.code,
                Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }

    /// More abandoned, trickling downloads than the fill bound: the
    /// upstream still gets at most `max_fills` of them, and its `/v2/`
    /// ping, a manifest and an access check still answer within a second,
    /// as does a client of another upstream. A client that then waits for a
    /// download takes an abandoned one's slot.
    func testAbandonedSlowFillsPastTheBoundStarveNeitherTheControlPlaneNorAnotherUpstream() async throws {
        let small = F.randomBytes(10_000)
        let smallDigest = F.digest(of: small)
        let slow = F.randomBytes(1 << 20)
        let slowGets = NIOLockedValueBox(0)
        let upstream = try await FakeUpstream { head in
            if head.uri == "/v2/" { return .init(body: Array("{}".utf8)) }
            if head.uri.contains("/manifests/") { return .init(headers: ["content-type": "application/json"], body: Array(#"{"m":1}"#.utf8)) }
            if head.uri.hasSuffix(smallDigest) { return .init(body: small) }
            if head.method == .GET { slowGets.withLockedValue { $0 += 1 } }
            // Any other blob trickles: 1 KiB every 200 ms.
            return .init(body: slow, chunkSize: 1024, delay: .milliseconds(200))
        }
        let other = F.randomBytes(300_000)
        let otherUpstream = try await FakeUpstream { _ in .init(body: other) }
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "slow.test", registry: "127.0.0.1", port: \(upstream.port), schema: "http", max_fills: 2}
              - {host: "other.test", registry: "127.0.0.1", port: \(otherUpstream.port), schema: "http"}
            """, extraYAML: "timeouts: {upstream: 1.5, upstream_idle: 5, shutdown: 1}")
        let base = proxy.base
        // One blob cached through the slow upstream, for the access check below.
        XCTAssertEqual(try timed("\(base)/v2/r/blobs/\(smallDigest)", host: "slow.test").body, Data(small))

        let digests = (0..<5).map { i in "sha256:" + String(repeating: String(i), count: 64) }
        try abandon(digests.map { "\(base)/v2/r/blobs/\($0)" }, host: "slow.test", after: 1)
        XCTAssertGreaterThanOrEqual(slowGets.withLockedValue { $0 }, 2)
        XCTAssertEqual(proxy.server.fills.peakDownloads(of: "slow.test"), 2, "at most max_fills downloads at once")
        // Their clients are gone: the waiting ones left the queue with them.
        XCTAssertEqual(try proxy.metric(#"cacheproxy_fills_waiting{upstream="slow.test"}"#), 0)

        let ping = try timed("\(base)/v2/", host: "slow.test")
        XCTAssertEqual(ping.code, 200)
        XCTAssertLessThan(ping.seconds, 1, "the /v2/ ping waited on downloads")
        let manifest = try timed("\(base)/v2/r/manifests/latest", host: "slow.test")
        XCTAssertEqual(String(decoding: manifest.body, as: UTF8.self), #"{"m":1}"#)
        XCTAssertLessThan(manifest.seconds, 1, "a manifest waited on downloads")
        let headsBefore = upstream.requests.filter { $0.method == .HEAD }.count
        let checked = try timed("\(base)/v2/r/blobs/\(smallDigest)", host: "slow.test",
                                ["-H", "Authorization: Basic bmV3OmNsaWVudA=="])
        XCTAssertEqual(checked.body, Data(small))
        XCTAssertLessThan(checked.seconds, 1, "an access check waited on downloads")
        XCTAssertEqual(upstream.requests.filter { $0.method == .HEAD }.count, headsBefore + 1, "the new credential was checked")
        let elsewhere = try timed("\(base)/v2/r/blobs/\(F.digest(of: other))", host: "other.test")
        XCTAssertEqual(elsewhere.body, Data(other))
        XCTAssertLessThan(elsewhere.seconds, 1, "another upstream's client waited")

        // A client that waits for a download gets a slot from an abandoned
        // one (at its next chunk), not a 503.
        let nines = "sha256:" + String(repeating: "9", count: 64)
        let waiting = Task.detached {
            try curl("\(base)/v2/r/blobs/\(nines)", ["-H", "Host: slow.test", "--max-time", "2"])
        }
        for _ in 0..<150 where !upstream.gets.contains(where: { $0.uri.hasSuffix(nines) }) {
            try await Task.sleep(for: .milliseconds(10))
        }
        XCTAssertTrue(upstream.gets.contains { $0.uri.hasSuffix(nines) }, "an abandoned download kept its slot from a waiting client")
        _ = try await waiting.value
        XCTAssertEqual(proxy.server.fills.peakDownloads(of: "slow.test"), 2, "at most max_fills downloads at once")
        await proxy.stop()
        await upstream.stop()
        await otherUpstream.stop()
    }

    /// With every slot held by a download someone still reads, a miss
    /// waits (counted) for `timeouts.upstream`, then is told to come back;
    /// a `HEAD` of the queued digest meanwhile goes to the upstream at once.
    func testAMissPastTheBoundWaitsThenGets503WhileAHeadOfItIsNotQueued() async throws {
        let slow = F.randomBytes(1 << 20)
        let upstream = try await FakeUpstream { head in
            .init(body: slow, chunkSize: 1024, delay: .milliseconds(100))
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"slow.test\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\", max_fills: 1}",
            extraYAML: "timeouts: {upstream: 1.5, upstream_idle: 5, shutdown: 1}")
        let base = proxy.base
        let reader = Task.detached {
            try curl("\(base)/v2/r/blobs/sha256:\(String(repeating: "1", count: 64))", ["-H", "Host: slow.test", "--max-time", "4"])
        }
        for _ in 0..<200 where upstream.gets.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        let queued = "\(base)/v2/r/blobs/sha256:\(String(repeating: "2", count: 64))"
        let waiting = Task.detached { try shell("curl", ["-si", "--max-time", "5", "-H", "Host: slow.test", queued]) }
        try await Task.sleep(for: .milliseconds(400))
        XCTAssertEqual(try proxy.metric(#"cacheproxy_fills_waiting{upstream="slow.test"}"#), 1)
        let head = try timed(queued, host: "slow.test", ["-I"])
        XCTAssertEqual(head.code, 200)
        XCTAssertLessThan(head.seconds, 1, "a HEAD waited in the download queue")
        let busy = try await waiting.value.output
        XCTAssertTrue(busy.hasPrefix("HTTP/1.1 503"), busy)
        XCTAssertTrue(busy.lowercased().contains("retry-after: 5"), busy)
        XCTAssertEqual(upstream.gets.count, 1, "the bound let a second download through")
        XCTAssertEqual(try proxy.metric(#"cacheproxy_fills_waiting{upstream="slow.test"}"#), 0)
        _ = try await reader.value
        await proxy.stop()
        await upstream.stop()
    }

    /// Upstream B trickles digest D; a client of upstream A, which has D at
    /// full speed, gets it from A at A's speed, not by joining B's fill.
    func testAClientOfOneUpstreamIsServedAtItsSpeedWhileAnotherTricklesTheSameDigest() async throws {
        let bytes = F.randomBytes(200_000)
        let digest = F.digest(of: bytes)
        let fast = try await FakeUpstream { _ in .init(body: bytes) }
        let trickling = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 2048, delay: .seconds(1)) }
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "a.test", registry: "127.0.0.1", port: \(fast.port), schema: "http"}
              - {host: "b.test", registry: "127.0.0.1", port: \(trickling.port), schema: "http"}
            """, extraYAML: "timeouts: {shutdown: 1}")
        let slowClient = Task.detached {
            try curl("\(proxy.base)/v2/r/blobs/\(digest)", ["-H", "Host: b.test", "--max-time", "3"])
        }
        for _ in 0..<200 where trickling.gets.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        XCTAssertEqual(trickling.gets.count, 1)
        let got = try timed("\(proxy.base)/v2/r/blobs/\(digest)", host: "a.test")
        XCTAssertEqual(got.body, Data(bytes))
        XCTAssertLessThan(got.seconds, 1.5, "A's client waited on B's download")
        XCTAssertEqual(fast.gets.count, 1, "A's client was served by A")
        _ = try await slowClient.value
        await proxy.stop()
        await fast.stop()
        await trickling.stop()
    }

    /// An upstream behind an SSO front answers anonymous requests with a
    /// redirect to a login page (200, HTML). That 200 is not the upstream's
    /// yes: an anonymous client that made the proxy fetch it (for any
    /// digest) is granted nothing, and gets the upstream's refusal for a
    /// blob of that repository someone else cached.
    func testALoginPageRedirectGrantsNothing() async throws {
        let secret = F.randomBytes(50_000)
        let digest = F.digest(of: secret)
        let good = "Basic Z29vZDp1c2Vy"
        let upstream = try await FakeUpstream { head in
            if head.uri.hasPrefix("/login") {
                return .init(headers: ["content-type": "text/html"], body: Array("<html>sign in</html>".utf8))
            }
            guard head.headers.first(name: "authorization") == good else {
                if head.method == .HEAD {
                    return .init(status: .unauthorized, headers: ["www-authenticate": #"Basic realm="corp""#])
                }
                return .init(status: .found, headers: ["location": "/login?next=\(head.uri)"])
            }
            return .init(body: secret)
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {shutdown: 1}")
        let url = "\(proxy.base)/v2/corp/private/blobs/"
        XCTAssertEqual(try curl(url + digest, ["-H", "Authorization: \(good)"]).body, Data(secret))
        // Anonymous: the fill of another digest lands on the login page.
        let login = try curl(url + "sha256:" + String(repeating: "a", count: 64))
        XCTAssertNotEqual(login.exit, 0, "the login page is not the blob: a cut")
        let stranger = try curl(url + digest)
        XCTAssertEqual(stranger.code, 401, "the login page's 200 granted the anonymous client the repository")
        XCTAssertFalse(stranger.body.range(of: Data(secret.prefix(64))) != nil)
        await proxy.stop()
        await upstream.stop()
    }
}
