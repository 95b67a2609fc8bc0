@testable import CacheProxy
import Foundation
import NIOHTTP1
import XCTest

/// `storage.max_size`: least recently used blobs go between the watermarks,
/// never one being read, and a blob larger than the whole cache is served
/// but not kept.
final class EvictionTests: XCTestCase {
    typealias F = FaultInjectionTests

    private func digest(_ n: Int) -> Digest {
        // swiftlint-free: a valid digest made of one repeated hex digit.
        try! Digest(parsing: "sha256:" + String(repeating: String(n, radix: 16), count: 64))
    }

    func testTheIndexEvictsLeastRecentlyUsedAndNeverWhatIsBeingRead() {
        var index = BlobIndex()
        for n in 1...4 { index.insert(digest(n), size: 100, now: 0) }  // same clock tick: order still kept
        XCTAssertEqual(index.totalBytes, 400)
        _ = index.use(digest(1), now: 0)  // 1 is now the most recent
        XCTAssertEqual(index.retain(digest(2), now: 0), 100)  // 2 is being read
        _ = index.use(digest(3), now: 0)
        let candidates = BlobIndex.byLastUse(index.idle())
        XCTAssertEqual(candidates.map(\.digest), [digest(4), digest(1), digest(3)], "oldest first, the one being read left out")
        // A candidate used after it was chosen is not evicted.
        _ = index.use(digest(1), now: 0)
        XCTAssertNil(index.evict(digest(1), chosenAt: candidates[1].lastAccess))
        XCTAssertEqual(index.evict(digest(4), chosenAt: candidates[0].lastAccess), 100)
        XCTAssertEqual(index.totalBytes, 300)
        XCTAssertNil(index.retain(digest(4), now: 0), "an evicted blob cannot be opened")
        index.release(digest(2))
        XCTAssertEqual(BlobIndex.byLastUse(index.idle()).map(\.digest), [digest(2), digest(3), digest(1)], "released: 2 is a candidate again")
    }

    /// After a restart the scan's file times order the blobs, whatever order
    /// the scan found them in; uses after that come later than all of them.
    func testScannedBlobsKeepTheirFileTimes() {
        var index = BlobIndex()
        for (n, time) in [(1, 50), (2, 10), (3, 90), (4, 30)] {
            index.insertScanned(digest(n), size: 1, lastAccess: UInt64(time))
        }
        XCTAssertEqual(BlobIndex.byLastUse(index.idle()).map(\.digest), [digest(2), digest(4), digest(1), digest(3)])
        _ = index.use(digest(2), now: 0)  // a clock behind the files' times still makes it the newest
        XCTAssertEqual(BlobIndex.byLastUse(index.idle()).last?.digest, digest(2))
    }

    /// The store's round: down to the low mark, least recently used first.
    func testARoundEvictsDownToItsTarget() async throws {
        let folder = try makeTemporaryFolder("evict")
        let blobs = (0..<4).map { _ in F.randomBytes(1000) }
        for bytes in blobs {
            let hex = String(F.digest(of: bytes).dropFirst(7))
            try FileManager.default.createDirectory(atPath: folder + "/blobs/sha256/\(hex.prefix(2))",
                                                    withIntermediateDirectories: true)
            try Data(bytes).write(to: URL(fileURLWithPath: folder + "/blobs/sha256/\(hex.prefix(2))/\(hex)"))
        }
        let store = try makeStore(folder)
        let digests = try blobs.map { try Digest(parsing: F.digest(of: $0)) }
        for d in [digests[2], digests[0], digests[3], digests[1]] { _ = store.use(d) }
        let evicted = await store.evict(toReach: 2500)
        XCTAssertEqual(evicted, 2)
        XCTAssertNil(store.size(of: digests[2]))
        XCTAssertNil(store.size(of: digests[0]))
        XCTAssertEqual(store.size(of: digests[3]), 1000)
        XCTAssertFalse(FileManager.default.fileExists(atPath: store.path(for: digests[2])))
        XCTAssertTrue(FileManager.default.fileExists(atPath: store.path(for: digests[1])))
        store.writer.shutdown()
    }

    func testSizesAreReadWithUnits() throws {
        func maxSize(_ value: String) throws -> Int64? {
            try ConfigLoader.parse(yaml: "api: {port: 1}\nupstreams: [{host: h, registry: r}]\nstorage: {folder: /x, max_size: \(value)}")
                .storage.maxSize
        }
        XCTAssertEqual(try maxSize("50GiB"), 50 << 30)
        XCTAssertEqual(try maxSize("500MB"), 500_000_000)
        XCTAssertEqual(try maxSize("1.5TiB"), Int64(1.5 * Double(1 << 40)))
        XCTAssertEqual(try maxSize("1048576"), 1_048_576)
        XCTAssertEqual(try maxSize("5.0e10"), 50_000_000_000, "a YAML float")
        for bad in ["-1", "0", "lots", "5XB", "GiB", "1e30", "0.5", "0.3B"] {
            XCTAssertThrowsError(try maxSize(bad), bad) { error in
                XCTAssertTrue("\(error)".contains("storage.max_size"), "\(error)")
            }
        }
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: """
            api: {port: 1}
            upstreams: [{host: h, registry: r}]
            storage: {folder: /x, max_size: 1GiB, high_watermark: 0.5, low_watermark: 0.8}
            """)) { XCTAssertTrue("\($0)".contains("storage.low_watermark"), "\($0)") }
    }

    /// Blobs of 40 kB (small enough for the memory cache) under a 100 kB
    /// limit: the third one pushes the least recently used one out, from
    /// the disk, the index and the memory cache alike.
    func testTheLeastRecentlyUsedBlobGoesWithItsMemoryCopy() async throws {
        let blobs = (0..<3).map { _ in F.randomBytes(40_000) }
        let byDigest = Dictionary(uniqueKeysWithValues: blobs.map { (F.digest(of: $0), $0) })
        let upstream = try await FakeUpstream { head in
            let key = String(head.uri.split(separator: "/").last ?? "")
            return .init(body: byDigest[key] ?? [])
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        storageYAML: ", max_size: 100000")
        let (a, b, c) = (F.digest(of: blobs[0]), F.digest(of: blobs[1]), F.digest(of: blobs[2]))
        func get(_ d: String) throws -> Data { try curl("\(proxy.base)/v2/x/blobs/\(d)").body }
        func fetched(_ d: String) -> Int { upstream.gets.filter { $0.uri.hasSuffix(d) }.count }
        func indexed(_ d: String) throws -> Bool { proxy.server.store.size(of: try Digest(parsing: d)) != nil }

        XCTAssertEqual(try get(a), Data(blobs[0]))
        XCTAssertTrue(try eventually { try indexed(a) })
        XCTAssertEqual(try get(a), Data(blobs[0]))  // a hit: now in the memory cache too
        XCTAssertNotNil(proxy.server.store.smallBlobs.get(try Digest(parsing: a)))
        XCTAssertEqual(try get(b), Data(blobs[1]))
        XCTAssertTrue(try eventually { try indexed(b) })
        XCTAssertEqual(try get(b), Data(blobs[1]))  // b used after a: a is the oldest
        XCTAssertEqual(try get(c), Data(blobs[2]))
        XCTAssertTrue(try eventually { try proxy.metric("cacheproxy_evictions_total") == 1 })
        XCTAssertFalse(try indexed(a))
        XCTAssertTrue(try indexed(b))
        XCTAssertTrue(try indexed(c))
        XCTAssertNil(proxy.server.store.smallBlobs.get(try Digest(parsing: a)), "the memory copy went with it")
        XCTAssertEqual(proxy.files(in: "blobs").count, 2)
        XCTAssertEqual(try proxy.metric("cacheproxy_cache_size_bytes"), 80_000)
        XCTAssertEqual(try proxy.metric("cacheproxy_cache_entries"), 2)
        // b is still a hit; a is fetched again.
        XCTAssertEqual(try get(b), Data(blobs[1]))
        XCTAssertEqual(fetched(b), 1)
        XCTAssertEqual(try get(a), Data(blobs[0]))
        XCTAssertEqual(fetched(a), 2)
        await proxy.stop()
        await upstream.stop()
    }

    func testABlobLargerThanTheWholeCacheIsServedButNotKept() async throws {
        let bytes = F.randomBytes(300_000)
        let upstream = try await FakeUpstream { _ in .init(body: bytes) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        storageYAML: ", max_size: 100000")
        let url = "\(proxy.base)/v2/x/blobs/\(F.digest(of: bytes))"
        let together = try curlAtOnce(url, count: 3)
        for got in together {
            XCTAssertEqual(got.code, 200)
            XCTAssertEqual(got.body, Data(bytes))
        }
        XCTAssertTrue(eventually { proxy.files(in: "tmp").isEmpty })
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(try proxy.metric("cacheproxy_cache_entries"), 0)
        XCTAssertEqual(try curl(url).body, Data(bytes), "and again, from the upstream")
        XCTAssertGreaterThanOrEqual(upstream.requests.count, 2)
        await proxy.stop()
        await upstream.stop()
    }

    /// A 1 MB hit read slowly while two more blobs push the cache over its
    /// limit: the one being read stays (its reader holds it), an idle one
    /// goes instead.
    func testABlobBeingReadIsNotEvictedUnderItsReader() async throws {
        let blobs = (0..<3).map { _ in F.randomBytes(1_000_000) }
        let byDigest = Dictionary(uniqueKeysWithValues: blobs.map { (F.digest(of: $0), $0) })
        let upstream = try await FakeUpstream { head in
            .init(body: byDigest[String(head.uri.split(separator: "/").last ?? "")] ?? [])
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        storageYAML: ", max_size: 2500000")
        let digests = blobs.map { F.digest(of: $0) }
        for d in digests.prefix(2) {
            _ = try curl("\(proxy.base)/v2/x/blobs/\(d)")
            let parsed = try Digest(parsing: d)
            XCTAssertTrue(eventually { proxy.server.store.size(of: parsed) != nil })
        }
        // blob 0 is the oldest; a slow reader holds it open.
        let reader = try SlowReader(port: proxy.port)
        XCTAssertTrue(reader.send("GET /v2/x/blobs/\(digests[0]) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
        let reading = Task.detached { reader.read(bytesPerSecond: 400_000, deadline: 20) }
        try await Task.sleep(for: .milliseconds(300))
        XCTAssertEqual(try curl("\(proxy.base)/v2/x/blobs/\(digests[2])").body, Data(blobs[2]))
        XCTAssertTrue(try eventually { try proxy.metric("cacheproxy_evictions_total") == 1 })
        XCTAssertNotNil(proxy.server.store.size(of: try Digest(parsing: digests[0])), "being read: kept")
        XCTAssertNil(proxy.server.store.size(of: try Digest(parsing: digests[1])), "idle: evicted instead")
        let result = await reading.value
        XCTAssertEqual(result.body, blobs[0], "the reader got it whole")
        reader.close()
        await proxy.stop()
        await upstream.stop()
    }
}
