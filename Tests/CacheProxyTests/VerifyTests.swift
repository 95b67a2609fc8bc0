import Foundation
import XCTest
@testable import CacheProxy

/// `cache-proxy verify` (the binary) on a folder a server is running on:
/// a cached file damaged on disk is found, reported, removed, and fetched
/// again whole on the next pull.
final class VerifyTests: XCTestCase {
    func testVerifyFindsAndRemovesADamagedBlobBesideARunningServer() async throws {
        let good = Array(repeating: UInt8(ascii: "g"), count: 300_000)
        let other = Array(repeating: UInt8(ascii: "o"), count: 5_000)
        let upstream = try await FakeUpstream { head in .init(body: head.uri.contains(TestImage.digest(Data(good))) ? good : other) }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        let (goodDigest, otherDigest) = (TestImage.digest(Data(good)), TestImage.digest(Data(other)))
        for digest in [goodDigest, otherDigest] {
            XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/blobs/\(digest)").code, 200)
        }
        // A small blob damaged on disk before its first hit (a power loss
        // with fsync off): the hit path checks it before keeping it in
        // memory, removes it, and the client gets the right bytes anyway.
        let otherPath = proxy.folder + "/blobs/sha256/\(otherDigest.dropFirst(7).prefix(2))/\(otherDigest.dropFirst(7))"
        // Published just after its client got the last byte.
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: otherPath) {
            try await Task.sleep(for: .milliseconds(20))
        }
        try Data(repeating: 0, count: other.count).write(to: URL(fileURLWithPath: otherPath))
        let small = try curl("\(proxy.base)/v2/lib/app/blobs/\(otherDigest)")
        XCTAssertEqual(small.code, 200)
        XCTAssertEqual(Array(small.body), other, "never the damaged bytes")
        XCTAssertEqual(Array(try curl("\(proxy.base)/v2/lib/app/blobs/\(otherDigest)").body), other)
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_digest_mismatches_total"), 1)

        let config = proxy.folder + "-verify.yaml"
        try """
            api: {port: 5000}
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(proxy.folder)"}
            """.write(toFile: config, atomically: true, encoding: .utf8)

        let clean = try shell(proxyBinary(), ["verify", "--config", config])
        XCTAssertEqual(clean.status, 0, clean.output)
        XCTAssertTrue(clean.output.contains("verified 2 files (305000 bytes)"), clean.output)

        // A power loss with fsync off: the right size, the wrong bytes.
        let path = proxy.folder + "/blobs/sha256/\(goodDigest.dropFirst(7).prefix(2))/\(goodDigest.dropFirst(7))"
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.seek(toOffset: 150_000)
        handle.write(Data(repeating: 0, count: 4096))
        try handle.close()

        let dry = try shell(proxyBinary(), ["verify", "--config", config, "--dry-run"])
        XCTAssertEqual(dry.status, 1, dry.output)
        XCTAssertTrue(dry.output.contains("DAMAGED \(path)"), dry.output)
        XCTAssertTrue(FileManager.default.fileExists(atPath: path), "a dry run removes nothing")

        // On a terminal: a progress bar, then the same report, and removal.
        let (status, output) = try shell("script", ["-qec", "\(proxyBinary()) verify --config \(config)", "/dev/null"])
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("] 100%  2/2 files"), output)
        XCTAssertTrue(output.contains("REMOVED \(path)"), output)
        XCTAssertTrue(output.contains("1 damaged and removed"), output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))

        // The running server fetches it again, whole.
        let again = try curl("\(proxy.base)/v2/lib/app/blobs/\(goodDigest)")
        XCTAssertEqual(again.code, 200)
        XCTAssertEqual(Array(again.body), good)
        XCTAssertEqual(try shell(proxyBinary(), ["verify", "--config", config]).status, 0)
        await proxy.stop()
        await upstream.stop()
    }

    /// A large cached file cut short (or grown) behind the running server's
    /// back: a large hit is not hashed again, and the file's own length would
    /// have gone out as `Content-Length`, a short layer the client takes as
    /// whole. The size it was published with is the check: the file is
    /// dropped and the blob fetched again, whole.
    func testALargeCachedFileOfTheWrongSizeIsFetchedAgainNotServed() async throws {
        let blob = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let upstream = try await FakeUpstream { _ in .init(body: blob) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let digest = TestImage.digest(Data(blob))
        let url = "\(proxy.base)/v2/lib/app/blobs/\(digest)"
        XCTAssertEqual(try curl(url).code, 200)
        let path = proxy.folder + "/blobs/sha256/\(digest.dropFirst(7).prefix(2))/\(digest.dropFirst(7))"
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: path) {
            try await Task.sleep(for: .milliseconds(20))
        }
        XCTAssertEqual(Data(try curl(url).body), Data(blob))
        XCTAssertEqual(upstream.gets.count, 1, "a hit")

        XCTAssertEqual(truncate(path, 100_000), 0)
        let cut = try curl(url)
        XCTAssertEqual(cut.code, 200)
        XCTAssertEqual(Data(cut.body), Data(blob), "never the short file")
        XCTAssertEqual(upstream.gets.count, 2, "fetched again")

        // Grown: the blob's bytes and then some.
        for _ in 0..<100 where (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) != blob.count {
            try await Task.sleep(for: .milliseconds(20))
        }
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: path))
        try handle.seekToEnd()
        handle.write(Data(repeating: 7, count: 4096))
        try handle.close()
        let grown = try curl(url)
        XCTAssertEqual(grown.code, 200)
        XCTAssertEqual(Data(grown.body), Data(blob), "never the grown file")
        XCTAssertEqual(upstream.gets.count, 3)
        XCTAssertEqual(Data(try curl(url).body), Data(blob))
        XCTAssertEqual(upstream.gets.count, 3, "the copy fetched again is a hit")
        await proxy.stop()
        await upstream.stop()
    }
}
