@testable import CacheProxy
import Crypto
import Foundation
import XCTest

/// `kill -9` at any moment of a fill, and a power loss after a publish with
/// `fsync: false`: after a restart nothing truncated or wrong is served and
/// no debris is left.
final class CrashSafetyTests: XCTestCase {
    typealias F = FaultInjectionTests

    /// Every file under `blobs/` hashes to its name.
    private func assertBlobsAreWhole(_ cache: String, file: StaticString = #filePath, line: UInt = #line) {
        let root = cache + "/blobs"
        for path in FileManager.default.subpaths(atPath: root) ?? [] where path.split(separator: "/").count == 3 {
            guard let data = FileManager.default.contents(atPath: root + "/" + path) else { continue }
            let hex = SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
            XCTAssertEqual(hex, String(path.split(separator: "/").last ?? ""), "a blob that is not its digest", file: file, line: line)
        }
    }

    func testKillNineAtRandomPointsOfFillsNeverLeavesABadBlobServed() async throws {
        let folder = try makeTemporaryFolder("crash")
        let cache = folder + "/cache"
        let blobs = (0..<8).map { _ in F.randomBytes(4_000_000) }
        let byDigest = Dictionary(uniqueKeysWithValues: blobs.map { (F.digest(of: $0), $0) })
        let upstream = try await FakeUpstream { head in
            .init(body: byDigest[String(head.uri.split(separator: "/").last ?? "")] ?? [],
                  chunkSize: 100_000, delay: .milliseconds(15))
        }
        var generator = SystemRandomNumberGenerator()
        for (round, bytes) in blobs.enumerated() {
            // A new blob each round (~0.6 s to fill), killed somewhere in it.
            let (daemon, port) = try startProxyProcess(folder: folder, config: """
                upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
                storage: {folder: "\(cache)", fsync: \(round % 2 == 0), io_backend: \(TestBackend.yaml)}
                """)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cache + "/tmp"), [], "round \(round): debris")
            assertBlobsAreWhole(cache)
            // Whatever the earlier rounds left is served whole, or fetched again.
            for earlier in blobs.prefix(round) {
                let got = try curl("http://127.0.0.1:\(port)/v2/a/blobs/\(F.digest(of: earlier))")
                XCTAssertEqual(got.body, Data(earlier), "round \(round)")
            }
            let url = "http://127.0.0.1:\(port)/v2/a/blobs/\(F.digest(of: bytes))"
            let client = Task.detached { try curl(url) }
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...800, using: &generator)))
            kill(daemon.process.processIdentifier, SIGKILL)
            daemon.process.waitUntilExit()
            let got = try await client.value
            if got.exit == 0 && got.code == 200 { XCTAssertEqual(got.body, Data(bytes), "a complete answer is the blob") }
        }
        let (daemon, port) = try startProxyProcess(folder: folder, config: """
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(cache)"}
            """)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cache + "/tmp"), [])
        assertBlobsAreWhole(cache)
        for bytes in blobs {
            XCTAssertEqual(try curl("http://127.0.0.1:\(port)/v2/a/blobs/\(F.digest(of: bytes))").body, Data(bytes))
        }
        daemon.stop()
        await upstream.stop()
    }

    /// What a power loss can do with `fsync: false`: the rename reached the
    /// disk, the data did not. The start-up scan finds the size recorded at
    /// publish differs, removes the file, and the blob is fetched again.
    func testTheScanRemovesBlobsCutShortBeforeTheyReachedTheDisk() async throws {
        let bytes = F.randomBytes(300_000)
        let other = F.randomBytes(200_000)
        let byDigest = [F.digest(of: bytes): bytes, F.digest(of: other): other]
        let upstream = try await FakeUpstream { head in
            .init(body: byDigest[String(head.uri.split(separator: "/").last ?? "")] ?? [])
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        for blob in [bytes, other] {
            _ = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: blob))")
            let digest = try Digest(parsing: F.digest(of: blob))
            XCTAssertTrue(eventually { proxy.server.store.size(of: digest) != nil })
        }
        await proxy.stop()
        let cut = proxy.server.store.path(for: try Digest(parsing: F.digest(of: bytes)))
        let kept = proxy.server.store.path(for: try Digest(parsing: F.digest(of: other)))
        XCTAssertEqual(truncate(cut, 4096), 0)
        // A zero-length file with no recorded size (a file system without
        // user attributes, or an older version's blob) under a digest that
        // is not the empty blob's.
        let emptyHex = String(repeating: "ab", count: 32)
        let emptyPath = proxy.folder + "/blobs/sha256/ab/" + emptyHex
        try FileManager.default.createDirectory(atPath: proxy.folder + "/blobs/sha256/ab", withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: emptyPath, contents: Data())

        let again = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port), folder: proxy.folder)
        XCTAssertFalse(FileManager.default.fileExists(atPath: cut), "removed at the scan")
        XCTAssertFalse(FileManager.default.fileExists(atPath: emptyPath))
        XCTAssertTrue(FileManager.default.fileExists(atPath: kept), "a whole blob stays")
        XCTAssertNil(again.server.store.size(of: try Digest(parsing: F.digest(of: bytes))))
        XCTAssertEqual(again.server.store.size(of: try Digest(parsing: F.digest(of: other))), 200_000)
        XCTAssertEqual(try curl("\(again.base)/v2/a/blobs/\(F.digest(of: bytes))").body, Data(bytes), "fetched again")
        XCTAssertEqual(upstream.gets.filter { $0.uri.hasSuffix(F.digest(of: bytes)) }.count, 2)
        XCTAssertEqual(upstream.gets.filter { $0.uri.hasSuffix(F.digest(of: other)) }.count, 1, "still a hit")
        await again.stop()
        await upstream.stop()
    }

    /// Two processes on one cache folder would delete each other's fills in
    /// `tmp/` at start: the second is refused, naming the folder, until the
    /// first is gone.
    func testOneProcessPerCacheFolder() async throws {
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(1))
        XCTAssertThrowsError(try makeStore(proxy.folder)) { error in
            XCTAssertTrue("\(error)".contains("in use by another cache-proxy"), "\(error)")
        }
        await proxy.stop()
        let next = try makeStore(proxy.folder)
        next.releaseFolder()
        next.writer.shutdown()
    }
}
