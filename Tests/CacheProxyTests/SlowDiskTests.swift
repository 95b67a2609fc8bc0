import Foundation
import NIOCore
import IOURing
import XCTest
@testable import CacheProxy
#if canImport(Glibc)
import Glibc
#endif

/// Time spent waiting on the disk is never the upstream's: a fill whose
/// writes are slow (a long fsync of another fill on a shared thread pool,
/// say) must not fail as "upstream idle" while its upstream is prompt.
final class SlowDiskTests: XCTestCase {
    /// Writes like the thread-pool backend, each after `delay`.
    struct SlowWriter: BlobWriter {
        let delay: Duration
        var backendName: String { "slow" }
        func open(_ path: String, flags: CInt, mode: mode_t) async throws -> CInt { Glibc.open(path, flags, mode) }
        func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws {
            try await Task.sleep(for: delay)
            let written = buffer.withUnsafeReadableBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
            guard written == buffer.readableBytes else { throw StoreError.system("pwrite", errno) }
        }
        func sync(_ fd: CInt) async throws {}
        func rename(_ from: String, to: String) async throws {}
        func unlink(_ path: String) async throws {}
        func close(_ fd: CInt) async { _ = Glibc.close(fd) }
        func setAttribute(_ name: String, to value: String, on fd: CInt) async throws {}
        func shutdown() {}
    }

    func testWaitingOnASlowDiskIsNotCountedAsASilentUpstream() async throws {
        let bytes = FaultInjectionTests.randomBytes(3 * BlobSink.batchSize)
        let digest = try Digest(parsing: FaultInjectionTests.digest(of: bytes))
        let upstream = ProxyConfig.Upstream(host: "h", registry: "127.0.0.1", port: 80, schema: "http", aliases: [])
        let fill = Fill(digest: digest, upstream: upstream, repository: "r", requestHeaders: [:], holdBack: 0)
        let folder = try makeTemporaryFolder("slow-disk")
        let fd = Glibc.open(folder + "/blob", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        defer { Glibc.close(fd) }
        // The upstream hands over a batch at once each time it is asked;
        // each write takes three times the idle limit.
        let hex = try await UpstreamBody.read(idle: .milliseconds(200)) { clock in
            var sink = BlobSink(writer: SlowWriter(delay: .milliseconds(600)), fd: fd, fill: fill, clock: clock,
                                algorithm: .sha256)
            for start in stride(from: 0, to: bytes.count, by: BlobSink.batchSize) {
                clock.tick()
                _ = try await sink.append(ByteBuffer(bytes: bytes[start..<(start + BlobSink.batchSize)]))
            }
            return try await sink.finish().hex
        }
        XCTAssertEqual(hex, digest.hex)
    }

    /// A cached file the kernel no longer holds in its page cache is read on
    /// the thread pool, not sent by a `sendfile` that would wait for the
    /// disk on the event loop; once warm, it goes by sendfile again. Every
    /// byte either way is the blob's.
    func testACachedBlobNotInThePageCacheIsReadOnTheThreadPool() async throws {
        typealias F = FaultInjectionTests
        let bytes = F.randomBytes(9_000_000)  // nine sendfile regions
        let upstream = try await FakeUpstream { _ in .init(body: bytes) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let digest = try Digest(parsing: F.digest(of: bytes))
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        let path = proxy.folder + "/blobs/sha256/\(digest.hex.prefix(2))/\(digest.hex)"
        XCTAssertEqual(try curl(url).body, Data(bytes), "the fill")
        XCTAssertEqual(try curl(url).body, Data(bytes), "a warm hit")
        XCTAssertEqual(try proxy.metric("cacheproxy_cold_read_bytes_total"), 0, "warm: all by sendfile")

        // Written back, then dropped from the page cache (clean pages go).
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
        let evicted = !PageCache.isResident(fd: fd, offset: 0, length: Int64(bytes.count))
        close(fd)
        // A tmpfs keeps its pages whatever fadvise says: nothing to show there.
        try XCTSkipUnless(evicted, "the temporary folder's file system keeps its pages in memory")

        let cold = try curl(url)
        XCTAssertEqual(cold.code, 200)
        XCTAssertTrue(cold.body == Data(bytes), "every byte, read from disk")
        let coldBytes = try proxy.metric("cacheproxy_cold_read_bytes_total")
        // At least the first region; the kernel's readahead may bring later
        // ones in, which then go by sendfile.
        XCTAssertGreaterThanOrEqual(coldBytes, Double(ResponseChannel.maxRegion))
        XCTAssertLessThanOrEqual(coldBytes, Double(bytes.count))
        XCTAssertTrue(try curl(url, ["-H", "Range: bytes=100-"]).body == Data(bytes[100...]), "warm again, a range")
        XCTAssertEqual(try proxy.metric("cacheproxy_cold_read_bytes_total"), coldBytes, "warm again: by sendfile")
        XCTAssertEqual(upstream.gets.count, 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// A warm file with a hole (a few pages taken by proactive reclaim, as
    /// DAMON's `pageout` does on the dev VM) has that region read on the
    /// pool and the rest sent by `sendfile` again: before, one reclaimed
    /// page turned the rest of a large answer into a copy through memory.
    func testAHoleInAWarmFileCostsOneRegionOnThePool() async throws {
        typealias F = FaultInjectionTests
        let region = Int(ResponseChannel.maxRegion)
        let bytes = F.randomBytes(8 * region)
        let upstream = try await FakeUpstream { _ in .init(body: bytes) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let digest = try Digest(parsing: F.digest(of: bytes))
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        let path = proxy.folder + "/blobs/sha256/\(digest.hex.prefix(2))/\(digest.hex)"
        XCTAssertEqual(try curl(url).body, Data(bytes), "the fill")
        XCTAssertEqual(try curl(url).body, Data(bytes), "a warm hit")

        // The second region's pages dropped, the rest kept.
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, off_t(region), off_t(region), POSIX_FADV_DONTNEED), 0)
        let holed = !PageCache.isResident(fd: fd, offset: Int64(region), length: Int64(region))
        let restWarm = PageCache.isResident(fd: fd, offset: Int64(2 * region), length: Int64(6 * region))
        close(fd)
        try XCTSkipUnless(holed && restWarm, "the temporary folder's file system keeps its pages in memory")

        XCTAssertTrue(try curl(url).body == Data(bytes), "every byte")
        XCTAssertEqual(try proxy.metric("cacheproxy_cold_read_bytes_total"), Double(region),
                       "the hole's region on the pool, the six warm ones after it by sendfile")
        await proxy.stop()
        await upstream.stop()
    }
}
