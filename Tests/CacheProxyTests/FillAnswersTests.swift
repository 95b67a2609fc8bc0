import Foundation
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy
import ProxyMetrics
#if canImport(Glibc)
import Glibc
#endif

/// A fill answers for its digest until it is published, and only with
/// verified bytes; redirects keep credentials at their origin; forwarding
/// headers are believed only when configured; fd pressure never makes the
/// cache forget a blob.
final class FillAnswersTests: XCTestCase {
    typealias F = FaultInjectionTests

    private func proxy(for upstream: FakeUpstream, fsync: Bool = false, apiYAML: String = "") async throws -> TestProxy {
        try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {upstream: 2, upstream_idle: 2}", fsync: fsync, apiYAML: apiYAML)
    }

    /// Four 2 MiB blobs, each served by its digest.
    private func fourBlobsUpstream() async throws -> ([[UInt8]], FakeUpstream) {
        let blobs = (0..<4).map { _ in F.randomBytes(2 << 20) }
        let upstream = try await FakeUpstream { head in
            .init(body: blobs.first { F.digest(of: $0) == head.uri.split(separator: "/").last.map(String.init) } ?? [],
                  chunkSize: 1 << 20)
        }
        return (blobs, upstream)
    }

    func testHeadDuringAFillIsAnsweredFromTheFill() async throws {
        let bytes = F.randomBytes(1_000_000)
        let digest = F.digest(of: bytes)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(150)) }
        let proxy = try await proxy(for: upstream)
        let getter = Task.detached { try curl("\(proxy.base)/v2/a/blobs/\(digest)") }
        for _ in 0..<100 where upstream.requests.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        let head = try shell("curl", ["-sI", "\(proxy.base)/v2/a/blobs/\(digest)"]).output
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), head)
        XCTAssertTrue(head.lowercased().contains("content-length: \(bytes.count)"), head)
        let got = try await getter.value
        XCTAssertTrue(Array(got.body) == bytes)
        XCTAssertEqual(upstream.requests.map(\.method), [.GET], "the HEAD never went upstream")
        await proxy.stop()
        await upstream.stop()
    }

    func testHeadRightAfterAGetNeverGoesUpstream() async throws {
        // With fsync on, the blob is published a moment after its last byte
        // went out: a HEAD sent as soon as the GET ends falls in that window.
        let (blobs, upstream) = try await fourBlobsUpstream()
        let proxy = try await proxy(for: upstream, fsync: true)
        for blob in blobs {
            let url = "\(proxy.base)/v2/a/blobs/\(F.digest(of: blob))"
            let (status, output) = try shell("sh", ["-c", "curl -s -o /dev/null \(url) && curl -sI \(url)"])
            XCTAssertEqual(status, 0)
            XCTAssertTrue(output.hasPrefix("HTTP/1.1 200"), output)
        }
        XCTAssertEqual(upstream.requests.filter { $0.method == .HEAD }.count, 0, "a HEAD reached the upstream")
        await proxy.stop()
        await upstream.stop()
    }

    /// A GET that comes between a fill's last byte and its publish (fsync
    /// on makes that window wide) gets no byte from the upstream: it is a
    /// hit, not a join.
    func testAGetBetweenTheLastByteAndThePublishCountsAsAHit() async throws {
        let (blobs, upstream) = try await fourBlobsUpstream()
        let proxy = try await proxy(for: upstream, fsync: true)
        for blob in blobs {
            let url = "\(proxy.base)/v2/a/blobs/\(F.digest(of: blob))"
            let (status, _) = try shell("sh", ["-c", "curl -s -o /dev/null \(url) && curl -s -o /dev/null \(url)"])
            XCTAssertEqual(status, 0)
        }
        XCTAssertEqual(upstream.gets.count, 4)
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_misses_total"), 4)
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_hits_total"), 4)
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_coalesced_total"), 0, "a read of verified bytes counted as a join")
        await proxy.stop()
        await upstream.stop()
    }

    func testTheEmptyBlobFromAChunkedUpstreamCompletes() async throws {
        let empty = F.digest(of: [])
        let upstream = try await FakeUpstream { _ in .init(body: [], chunked: true) }
        let proxy = try await proxy(for: upstream)
        let result = try curl("\(proxy.base)/v2/a/blobs/\(empty)", ["--max-time", "5"])
        XCTAssertEqual(result.exit, 0, "the answer completes instead of hanging")
        XCTAssertEqual(result.code, 200)
        XCTAssertEqual(result.body.count, 0)
        await proxy.stop()
        await upstream.stop()
    }

    func testAnEmptyBodyForAnotherDigestIsNeverACompleteAnswer() async throws {
        let upstream = try await FakeUpstream { _ in .init(headers: ["content-length": "0"], body: []) }
        let proxy = try await proxy(for: upstream)
        let result = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: Array("abc".utf8)))", ["--max-time", "5"])
        XCTAssertFalse(result.exit == 0 && result.code == 200, "an unverified empty 200 was completed")
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        await proxy.stop()
        await upstream.stop()
    }

    func testARangeOnAMissIsAnsweredOnlyFromVerifiedBytes() async throws {
        let good = F.randomBytes(300_000)
        var bad = good
        bad[bad.count - 1] ^= 0xff
        let corrupt = bad
        let upstream = try await FakeUpstream { _ in .init(body: good, chunkSize: 50_000) }
        let proxy = try await proxy(for: upstream)
        let claimed = F.digest(of: good)
        // The same digest from an upstream that sends corrupt bytes.
        let upstreamCorrupt = try await FakeUpstream { _ in .init(body: corrupt, chunkSize: 50_000) }
        let proxyCorrupt = try await self.proxy(for: upstreamCorrupt)
        let cut = try curl("\(proxyCorrupt.base)/v2/a/blobs/\(claimed)", ["-H", "Range: bytes=0-99", "--max-time", "5"])
        XCTAssertNotEqual(cut.exit, 0, "a complete 206 of unverified bytes")
        XCTAssertLessThan(cut.body.count, 100)
        let fine = try curl("\(proxy.base)/v2/a/blobs/\(claimed)", ["-H", "Range: bytes=0-99"])
        XCTAssertEqual(fine.exit, 0)
        XCTAssertEqual(fine.code, 206)
        XCTAssertEqual(Array(fine.body), Array(good[0..<100]))
        await proxyCorrupt.stop()
        await upstreamCorrupt.stop()
        await proxy.stop()
        await upstream.stop()
    }

    func testA401WhoseBodyStallsStillReachesTheClientWithItsChallenge() async throws {
        let upstream = try await FakeUpstream { _ in
            .init(status: .unauthorized, headers: ["www-authenticate": #"Bearer realm="http://auth/token""#],
                  body: Array(repeating: UInt8(ascii: "x"), count: 10_000), chunkSize: 100,
                  stallAfter: 100, stallFor: .seconds(8))
        }
        let proxy = try await proxy(for: upstream)
        let started = Date()
        let head = try shell("curl", ["-s", "-D", "-", "-o", "/dev/null", "--max-time", "10",
                                      "\(proxy.base)/v2/a/blobs/\(F.digest(of: [3]))"]).output
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 401"), head)
        XCTAssertTrue(head.lowercased().contains("www-authenticate: bearer"), head)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "upstream_idle is 2 s")
        await proxy.stop()
        await upstream.stop()
    }

    func testARedirectToAnotherPortGetsNoAuthorization() async throws {
        let bytes = F.randomBytes(10_000)
        let digest = F.digest(of: bytes)
        let other = try await FakeUpstream { _ in .init(body: bytes) }
        let registry = try await FakeUpstream { _ in
            .init(status: .temporaryRedirect, headers: ["location": "http://127.0.0.1:\(other.port)/blob"])
        }
        let proxy = try await proxy(for: registry)
        let result = try curl("\(proxy.base)/v2/a/blobs/\(digest)",
                              ["-H", "Authorization: Bearer secret", "-H", "Cookie: session=1"])
        XCTAssertEqual(result.code, 200)
        XCTAssertEqual(registry.requests.first?.headers.first(name: "authorization"), "Bearer secret")
        XCTAssertNil(other.requests.first?.headers.first(name: "authorization"), "credentials leaked to another port")
        XCTAssertNil(other.requests.first?.headers.first(name: "cookie"))
        await proxy.stop()
        await registry.stop()
        await other.stop()
    }

    func testRedirectsToOtherSchemesAndEndlessRedirectsAre502() async throws {
        let digest = F.digest(of: [9])
        let registry = try await FakeUpstream { head in
            head.uri.contains("loop")
                ? .init(status: .temporaryRedirect, headers: ["location": head.uri])
                : .init(status: .temporaryRedirect, headers: ["location": "file:///etc/passwd"])
        }
        let proxy = try await proxy(for: registry)
        XCTAssertEqual(try curl("\(proxy.base)/v2/a/blobs/\(digest)").code, 502)
        let before = registry.requests.count
        XCTAssertEqual(try curl("\(proxy.base)/v2/loop/blobs/\(digest)").code, 502)
        XCTAssertLessThanOrEqual(registry.requests.count - before, 6, "hops are capped")
        await proxy.stop()
        await registry.stop()
    }

    func testForwardingHeadersAreBelievedOnlyWhenConfigured() async throws {
        // The upstream writes its own origin into Location (the client
        // tells it its port, as it cannot know it before it listens).
        let upload = try await FakeUpstream { head in
            .init(status: .accepted, headers: ["location": "http://127.0.0.1:\(head.headers.first(name: "x-upstream-port") ?? "")/v2/a/blobs/uploads/1"])
        }
        let plain = try await proxy(for: upload)
        let trusting = try await proxy(for: upload, apiYAML: ", trust_forwarded_headers: true")
        let headers = ["-H", "X-Forwarded-Proto: https", "-H", "X-Forwarded-Host: mirror.example",
                       "-H", "X-Forwarded-For: 10.9.8.7", "-H", "Forwarded: for=10.9.8.7",
                       "-H", "X-Upstream-Port: \(upload.port)", "-X", "POST", "-D", "-", "-o", "/dev/null"]
        let fromPlain = try shell("curl", ["-s"] + headers + ["\(plain.base)/v2/a/blobs/uploads/"]).output.lowercased()
        XCTAssertTrue(fromPlain.contains("location: http://127.0.0.1:\(plain.port)/v2/a/blobs/uploads/1"), fromPlain)
        XCTAssertEqual(upload.requests.last?.headers.first(name: "x-forwarded-proto"), "http")
        XCTAssertEqual(upload.requests.last?.headers[canonicalForm: "x-forwarded-for"], ["127.0.0.1"],
                       "a client's claim about earlier hops is dropped")
        XCTAssertNil(upload.requests.last?.headers.first(name: "forwarded"))
        let fromTrusting = try shell("curl", ["-s"] + headers + ["\(trusting.base)/v2/a/blobs/uploads/"]).output.lowercased()
        XCTAssertTrue(fromTrusting.contains("location: https://mirror.example/v2/a/blobs/uploads/1"), fromTrusting)
        XCTAssertEqual(upload.requests.last?.headers.first(name: "x-forwarded-proto"), "https")
        XCTAssertEqual(upload.requests.last?.headers[canonicalForm: "x-forwarded-for"], ["10.9.8.7", "127.0.0.1"])
        await plain.stop()
        await trusting.stop()
        await upload.stop()
    }

    func testFdPressureDoesNotMakeTheCacheForgetABlob() async throws {
        let folder = try makeTemporaryFolder("fds")
        let bytes: [UInt8] = Array(repeating: 7, count: 100)
        let hex = String(F.digest(of: bytes).dropFirst(7))
        try FileManager.default.createDirectory(atPath: folder + "/blobs/sha256/\(hex.prefix(2))",
                                                withIntermediateDirectories: true)
        try Data(bytes).write(to: URL(fileURLWithPath: folder + "/blobs/sha256/\(hex.prefix(2))/\(hex)"))
        let metrics = ProxyMetrics()
        let store = try makeStore(folder, metrics: metrics)
        let digest = try Digest(parsing: "sha256:" + hex)

        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        let saved = limit
        // Fill the table up to a low soft limit: the next open gets EMFILE.
        limit.rlim_cur = 64
        var held: [Int32] = []
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        while true {
            let fd = open("/dev/null", O_RDONLY)
            if fd < 0 { break }
            held.append(fd)
            if held.count > 100_000 { break }
        }
        let underPressure = store.openCached(digest)
        for fd in held { close(fd) }
        var restore = saved
        setrlimit(Int32(RLIMIT_NOFILE.rawValue), &restore)

        guard case .unavailable = underPressure else { return XCTFail("expected .unavailable, got \(underPressure)") }
        XCTAssertEqual(store.size(of: digest), 100, "still indexed")
        guard case .file(let fd, let size) = store.openCached(digest) else { return XCTFail("served again") }
        close(fd)
        XCTAssertEqual(size, 100)
        XCTAssertTrue(metrics.exposition().contains(#"cacheproxy_file_open_errors_total{reason="emfile"} 1"#))
        // A file replaced by a symlink (ELOOP) is unusable: forgotten, fetched again.
        try FileManager.default.removeItem(atPath: store.path(for: digest))
        try FileManager.default.createSymbolicLink(atPath: store.path(for: digest), withDestinationPath: "/etc/passwd")
        guard case .missing = store.openCached(digest) else { return XCTFail("expected .missing") }
        XCTAssertNil(store.size(of: digest))
        // A FIFO in its place must not block the caller (an event loop) in
        // open(): unusable, forgotten at once.
        try FileManager.default.removeItem(atPath: store.path(for: digest))
        XCTAssertEqual(mkfifo(store.path(for: digest), 0o644), 0)
        let rescan = BlobScan.run(blobsFolder: folder + "/blobs", logger: .init(label: "t"))
        XCTAssertNil(rescan.found[digest], "the scan indexes regular files only")
        // Put it in the index as a publish would, then open: no hang.
        let started = Date()
        try FileManager.default.removeItem(atPath: store.path(for: digest))
        try Data(bytes).write(to: URL(fileURLWithPath: folder + "/blob-copy"))
        let copy = open(folder + "/blob-copy", O_RDWR)
        try await store.publish(temporary: (folder + "/blob-copy", copy), digest: digest, size: 100)
        close(copy)
        try FileManager.default.removeItem(atPath: store.path(for: digest))
        XCTAssertEqual(mkfifo(store.path(for: digest), 0o644), 0)
        guard case .missing = store.openCached(digest) else { return XCTFail("a FIFO is not a blob") }
        XCTAssertLessThan(Date().timeIntervalSince(started), 1)
    }
}
