import Crypto
import Foundation
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// Faults a real registry cannot produce, from an in-process fake upstream,
/// against the proxy running in-process. Clients are real `curl` processes.
final class FaultInjectionTests: XCTestCase {
    static func digest(of bytes: [UInt8]) -> String {
        "sha256:" + SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
    }

    /// Random bytes, eight at a time (byte by byte, a 32 MiB blob took
    /// seconds in a debug build).
    static func randomBytes(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { raw in
            var offset = 0
            while offset < count {
                var word = generator.next()
                let n = min(8, count - offset)
                withUnsafeBytes(of: &word) { raw.baseAddress!.advanced(by: offset).copyMemory(from: $0.baseAddress!, byteCount: n) }
                offset += n
            }
        }
        return bytes
    }

    func upstreamYAML(_ port: Int, host: String = "127.0.0.1") -> String {
        "  - {host: \"\(host)\", registry: \"127.0.0.1\", port: \(port), schema: \"http\"}"
    }

    func testWrongBytesAreNeverServedWholeNorStored() async throws {
        let claimed = Self.randomBytes(300_000)
        let digest = Self.digest(of: claimed)
        var corrupted = claimed
        corrupted[corrupted.count - 1] ^= 0xff  // differs only in the very last byte
        let wrong = corrupted
        let upstream = try await FakeUpstream { _ in .init(body: wrong) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let result = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertNotEqual(result.exit, 0, "curl must see a cut connection, not a complete body")
        XCTAssertLessThan(result.body.count, wrong.count)
        XCTAssertEqual(Array(result.body), Array(wrong.prefix(result.body.count)))
        try await Task.sleep(for: .milliseconds(200))
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        XCTAssertEqual(try proxy.metric("cacheproxy_digest_mismatches_total"), 1)
        // The next request tries again: nothing bad was remembered.
        _ = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(upstream.gets.count, 2)
        await proxy.stop()
        await upstream.stop()
    }

    /// An HTTP/1.0 client of a blob of unknown length (a chunked upstream)
    /// reads the body to the connection's end: a wrong digest must end in a
    /// reset, or the client would take the cut body for the whole.
    func testAnHTTP10ClientOfAChunkedWrongBlobSeesAReset() async throws {
        let claimed = Self.randomBytes(300_000)
        let wrong = Array(claimed.reversed())
        let upstream = try await FakeUpstream { _ in .init(body: wrong, chunked: true) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let result = try curl("\(proxy.base)/v2/a/blobs/\(Self.digest(of: claimed))", ["--http1.0"])
        XCTAssertNotEqual(result.exit, 0, "a reset, not a clean end of an unframed body")
        XCTAssertLessThan(result.body.count, wrong.count)
        await proxy.stop()
        await upstream.stop()
    }

    func testUpstreamCutMidBlobLeavesNothing() async throws {
        let bytes = Self.randomBytes(1_000_000)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, cutAfter: 400_000) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let result = try curl("\(proxy.base)/v2/a/blobs/\(Self.digest(of: bytes))")
        XCTAssertNotEqual(result.exit, 0)
        XCTAssertLessThanOrEqual(result.body.count, 400_000)
        try await Task.sleep(for: .milliseconds(200))
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        XCTAssertEqual(try proxy.metric("cacheproxy_fill_failures_total"), 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// An upstream that cuts a fill followed by many clients: every one
    /// of them is cut (none gets a body that looks whole), and nothing of
    /// the fill is kept.
    func testEveryClientOfACutFillIsCutAndNothingIsKept() async throws {
        let bytes = Self.randomBytes(2_000_000)
        let digest = Self.digest(of: bytes)
        // ~1 s of streaming before the cut: all eight clients join the fill.
        let upstream = try await FakeUpstream { _ in
            .init(body: bytes, chunkSize: 50_000, delay: .milliseconds(50), cutAfter: 1_000_000)
        }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let started = Date()
        let results = try curlAtOnce("\(proxy.base)/v2/a/blobs/\(digest)", count: 8)
        XCTAssertLessThan(Date().timeIntervalSince(started), 10, "cut when the upstream cut, not at curl's own timeout")
        for (exit, body, code) in results {
            XCTAssertEqual(code, 200, "each joined the fill")
            // 18: the connection ended short of Content-Length; 56: reset.
            XCTAssertTrue([18, 56].contains(exit), "a cut, never a complete-looking body (curl exit \(exit))")
            XCTAssertGreaterThan(body.count, 0)
            XCTAssertEqual(Array(body), Array(bytes.prefix(body.count)), "what came before the cut is the blob's")
        }
        XCTAssertEqual(upstream.gets.count, 1, "one fill for all clients")
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_coalesced_total"), 7)
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        XCTAssertEqual(try proxy.metric("cacheproxy_fill_failures_total"), 1)
        await proxy.stop()
        await upstream.stop()
    }

    func testRedirectToAnotherHostDoesNotGetAuthorization() async throws {
        let bytes = Self.randomBytes(50_000)
        let digest = Self.digest(of: bytes)
        let cdn = try await FakeUpstream { _ in .init(body: bytes) }
        let registry = try await FakeUpstream { _ in
            .init(status: .temporaryRedirect,
                  headers: ["location": "http://localhost:\(cdn.port)/signed/blob?sig=abc"])
        }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(registry.port))
        let result = try curl("\(proxy.base)/v2/a/blobs/\(digest)", ["-H", "Authorization: Bearer secret-token"])
        XCTAssertEqual(result.exit, 0)
        XCTAssertEqual(result.code, 200)
        XCTAssertEqual(Array(result.body), bytes)
        XCTAssertEqual(registry.requests.first?.headers.first(name: "authorization"), "Bearer secret-token")
        XCTAssertEqual(cdn.requests.count, 1)
        XCTAssertEqual(cdn.requests.first?.uri, "/signed/blob?sig=abc")
        XCTAssertNil(cdn.requests.first?.headers.first(name: "authorization"), "credentials leaked to the redirect target")
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 }, "the blob is cached, the signed URL is not")
        await proxy.stop()
        await registry.stop()
        await cdn.stop()
    }

    func testSixteenClientsOnASlowStreamMakeOneUpstreamRequest() async throws {
        let bytes = Self.randomBytes(2_000_000)
        let digest = Self.digest(of: bytes)
        // ~2 s of streaming: all 16 clients arrive while the fill runs.
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 50_000, delay: .milliseconds(50)) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        let results = try curlAtOnce(url, count: 16)
        XCTAssertEqual(results.count, 16)
        for (exit, body, _) in results {
            XCTAssertEqual(exit, 0)
            XCTAssertEqual(Self.digest(of: Array(body)), digest)
        }
        XCTAssertEqual(upstream.gets.count, 1, "one fill for all clients")
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_misses_total") + proxy.metric("cacheproxy_blob_coalesced_total")
                       + proxy.metric("cacheproxy_blob_hits_total"), 16)
        await proxy.stop()
        await upstream.stop()
    }

    func testClientThatLeavesDoesNotStopTheFill() async throws {
        let bytes = Self.randomBytes(1_000_000)
        let digest = Self.digest(of: bytes)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(50)) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let socket = try RawSocket(port: proxy.port)
        socket.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        let head = socket.receiveHead()
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), head)
        socket.close()
        for _ in 0..<100 where proxy.files(in: "blobs").isEmpty {
            try await Task.sleep(for: .milliseconds(50))
        }
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 })
        let hit = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(Array(hit.body), bytes)
        XCTAssertEqual(upstream.gets.count, 1)
        await proxy.stop()
        await upstream.stop()
    }

    func testUpstreamErrorStatusPassesThroughAndIsNotStored() async throws {
        let challenge = "Bearer realm=\"https://auth.example/token\",service=\"registry\",scope=\"repository:a:pull\""
        let upstream = try await FakeUpstream { head in
            head.uri.contains("/blobs/sha256:0")
                ? .init(status: .unauthorized, headers: ["www-authenticate": challenge, "content-type": "application/json"],
                        body: Array(#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.utf8))
                : .init(status: .tooManyRequests, headers: ["retry-after": "7"], body: Array("slow down".utf8))
        }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let unauthorized = try shell("curl", ["-si", "\(proxy.base)/v2/a/blobs/sha256:\(String(repeating: "0", count: 64))"]).output
        XCTAssertTrue(unauthorized.hasPrefix("HTTP/1.1 401"), unauthorized)
        XCTAssertTrue(unauthorized.contains(challenge), "WWW-Authenticate must be passed on unchanged")
        XCTAssertTrue(unauthorized.contains("UNAUTHORIZED"))
        let limited = try curl("\(proxy.base)/v2/a/blobs/sha256:\(String(repeating: "1", count: 64))")
        XCTAssertEqual(limited.code, 429)
        XCTAssertEqual(String(decoding: limited.body, as: UTF8.self), "slow down")
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        await proxy.stop()
        await upstream.stop()
    }

    func testSilentUpstreamGets504InTime() async throws {
        let upstream = try await FakeUpstream { _ in .init(silent: true) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port), extraYAML: "timeouts: {upstream: 1}")
        let started = Date()
        let manifest = try curl("\(proxy.base)/v2/a/manifests/latest")
        XCTAssertEqual(manifest.code, 504)
        XCTAssertTrue(String(decoding: manifest.body, as: UTF8.self).contains(#""code":"TIMEOUT""#))
        let blob = try curl("\(proxy.base)/v2/a/blobs/sha256:\(String(repeating: "2", count: 64))")
        XCTAssertEqual(blob.code, 504)
        XCTAssertLessThan(Date().timeIntervalSince(started), 10)
        await proxy.stop()
        await upstream.stop()
    }

    func testUnreachableUpstreamGets502() async throws {
        let port = try freePort()
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(port), extraYAML: "timeouts: {connect: 1}")
        let manifest = try curl("\(proxy.base)/v2/a/manifests/latest")
        XCTAssertEqual(manifest.code, 502)
        XCTAssertTrue(String(decoding: manifest.body, as: UTF8.self).contains(#""errors""#))
        let blob = try curl("\(proxy.base)/v2/a/blobs/sha256:\(String(repeating: "3", count: 64))")
        XCTAssertEqual(blob.code, 502)
        await proxy.stop()
    }

    func testRangeOnAMissIsServedFromTheFill() async throws {
        let bytes = Self.randomBytes(500_000)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(20)) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let result = try shell("curl", ["-si", "-H", "Range: bytes=1000-1999", "\(proxy.base)/v2/a/blobs/\(Self.digest(of: bytes))"]).output
        XCTAssertTrue(result.hasPrefix("HTTP/1.1 206"), result)
        XCTAssertTrue(result.lowercased().contains("content-range: bytes 1000-1999/500000"))
        XCTAssertNil(upstream.requests.first?.headers.first(name: "range"), "the fill asks for the whole blob")
        await proxy.stop()
        await upstream.stop()
    }

    func testGracefulShutdownLetsAnInFlightFillAndItsClientFinish() async throws {
        let bytes = Self.randomBytes(1_000_000)
        let digest = Self.digest(of: bytes)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(100)) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        let download = Task.detached { try curl(url) }
        try await Task.sleep(for: .milliseconds(300))
        await proxy.stop()  // SIGTERM's path: drain, then return
        let result = try await download.value
        XCTAssertEqual(result.exit, 0)
        XCTAssertEqual(Self.digest(of: Array(result.body)), digest, "the client got the whole, right blob")
        XCTAssertEqual(proxy.files(in: "blobs").count, 1, "the fill was published before exit")
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        await upstream.stop()
    }

    func testAClientJoiningAFillRefusedForOthersCredentialsAsksWithItsOwn() async throws {
        let bytes = Self.randomBytes(200_000)
        let digest = Self.digest(of: bytes)
        let upstream = try await FakeUpstream { head in
            head.headers.first(name: "authorization") == "Bearer good"
                ? .init(body: bytes)
                : .init(status: .unauthorized, headers: ["www-authenticate": "Bearer realm=\"x\""], headDelay: .milliseconds(500))
        }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        let refused = Task.detached { try curl(url, ["-H", "Authorization: Bearer bad"]) }
        // The second client starts once the first one's fill is at the
        // upstream (which holds its 401 for 500 ms).
        for _ in 0..<100 where upstream.requests.isEmpty { try await Task.sleep(for: .milliseconds(20)) }
        let allowed = try await Task.detached { try curl(url, ["-H", "Authorization: Bearer good"]) }.value
        let refusedCode = try await refused.value.code
        XCTAssertEqual(refusedCode, 401)
        XCTAssertEqual(allowed.code, 200)
        XCTAssertEqual(Array(allowed.body), bytes)
        // A join is checked with the client's own credentials (one HEAD);
        // the request is counted once, as the miss its retry was.
        XCTAssertEqual(upstream.requests.filter { $0.method == .HEAD }.map { $0.headers.first(name: "authorization") },
                       ["Bearer good"], "the second client did join first")
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_coalesced_total"), 0)
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_misses_total"), 2)
        XCTAssertEqual(upstream.gets.map { $0.headers.first(name: "authorization") },
                       ["Bearer bad", "Bearer good"])
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 }, "the retry was a verified fill, not an unchecked pass-through")
        await proxy.stop()
        await upstream.stop()
    }

    func testHeadersGoOutAsSoonAsTheUpstreamAnswers() async throws {
        // Smaller than the held-back tail: no body byte may go out before
        // the digest is checked, but the head must not wait for that.
        let bytes = Self.randomBytes(10_000)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 5000, delay: .milliseconds(700)) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let socket = try RawSocket(port: proxy.port)
        let started = Date()
        socket.send("GET /v2/a/blobs/\(Self.digest(of: bytes)) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let head = socket.receiveHead()
        let headAfter = Date().timeIntervalSince(started)
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), head)
        XCTAssertTrue(head.lowercased().contains("content-length: 10000"), head)
        XCTAssertLessThan(headAfter, 0.5, "the head waited for the body")
        let body = socket.receive()
        XCTAssertEqual(body, bytes)
        XCTAssertGreaterThan(Date().timeIntervalSince(started), 0.6, "the body came after the upstream finished")
        await proxy.stop()
        await upstream.stop()
    }

    func testSHA512BlobsAreVerifiedAndStoredUnderTheirAlgorithm() async throws {
        let bytes = Self.randomBytes(100_000)
        let digest = "sha512:" + SHA512.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
        let upstream = try await FakeUpstream { _ in .init(body: bytes) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let first = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(first.code, 200)
        XCTAssertEqual(Array(first.body), bytes)
        // Publishing (fsync, rename) may finish just after the client's last
        // byte, which goes out once the digest is verified.
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 })
        let stored = proxy.files(in: "blobs")
        XCTAssertEqual(stored.count, 1)
        XCTAssertTrue(stored.first?.hasPrefix("sha512/") ?? false, "\(stored)")
        XCTAssertEqual(Array(try curl("\(proxy.base)/v2/a/blobs/\(digest)").body), bytes)
        XCTAssertEqual(upstream.gets.count, 1)
        await proxy.stop()
        await upstream.stop()
    }

    func testChunkedUpstreamIsVerifiedAndCutWhenWrong() async throws {
        let bytes = Self.randomBytes(400_000)
        let digest = Self.digest(of: bytes)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunked: true) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        let good = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(good.exit, 0)
        XCTAssertEqual(Array(good.body), bytes)
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 })
        XCTAssertEqual(upstream.requests.first?.uri, "/v2/a/blobs/\(digest)")

        // Same bytes under another repository name: a hit, no upstream GET
        // (only the HEAD that checks access to that repository).
        let hit = try curl("\(proxy.base)/v2/b/blobs/\(digest)")
        XCTAssertEqual(Array(hit.body), bytes)
        XCTAssertEqual(upstream.gets.count, 1)
        XCTAssertEqual(upstream.requests.filter { $0.method == .HEAD }.map(\.uri), ["/v2/b/blobs/\(digest)"])

        let otherBytes = Self.randomBytes(300_000)
        let otherDigest = Self.digest(of: otherBytes)
        let badUpstream = try await FakeUpstream { _ in .init(body: Array(otherBytes.reversed()), chunked: true) }
        let badProxy = try await TestProxy(upstreamsYAML: upstreamYAML(badUpstream.port))
        let cut = try curl("\(badProxy.base)/v2/a/blobs/\(otherDigest)")
        XCTAssertNotEqual(cut.exit, 0, "an unterminated chunked body, not a complete one")
        XCTAssertLessThan(cut.body.count, otherBytes.count)
        XCTAssertEqual(badProxy.files(in: "blobs"), [])
        await badProxy.stop()
        await badUpstream.stop()
        await proxy.stop()
        await upstream.stop()
    }

    func testAFillThatCannotCreateItsFileStillServesVerifiedBytesAndStoresNothing() async throws {
        let bytes = Self.randomBytes(100_000)
        let upstream = try await FakeUpstream { _ in .init(body: bytes) }
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(upstream.port))
        // tmp/ replaced by a plain file: creating a temporary file fails (as
        // on a read-only or broken file system; root ignores permissions).
        try FileManager.default.removeItem(atPath: proxy.folder + "/tmp")
        FileManager.default.createFile(atPath: proxy.folder + "/tmp", contents: Data())
        let served = try curl("\(proxy.base)/v2/a/blobs/\(Self.digest(of: bytes))")
        XCTAssertEqual(served.code, 200)
        XCTAssertEqual(served.body, Data(bytes), "streamed from memory, verified")
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(try proxy.metric(#"cacheproxy_fill_errors_total{reason="other"}"#), 1)
        XCTAssertEqual(try curl(proxy.base + "/healthz").code, 200)
        await proxy.stop()
        await upstream.stop()
    }
}
