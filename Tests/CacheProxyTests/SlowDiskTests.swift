import Foundation
import NIOConcurrencyHelpers
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
            var sink = BlobSink(writer: RecordingWriter(delay: .milliseconds(600)), fd: fd, fill: fill, clock: clock,
                                algorithm: .sha256)
            for start in stride(from: 0, to: bytes.count, by: BlobSink.batchSize) {
                clock.tick()
                try await sink.append(ByteBuffer(bytes: bytes[start..<(start + BlobSink.batchSize)]))
            }
            return try await sink.finish()
        }
        XCTAssertEqual(hex, digest.hex)
    }

    /// Writes like the thread-pool backend, each after `delay`, noting where
    /// each batch's bytes were.
    final class RecordingWriter: BlobWriter, Sendable {
        let delay: Duration
        private let writes = NIOLockedValueBox<[(address: UInt, count: Int, capacity: Int)]>([])
        var seen: [(address: UInt, count: Int, capacity: Int)] { writes.withLockedValue { $0 } }
        var backendName: String { "recording" }
        init(delay: Duration = .zero) { self.delay = delay }
        func open(_ path: String, flags: CInt, mode: mode_t) async throws -> CInt { Glibc.open(path, flags, mode) }
        func write(_ buffer: ByteBuffer, to fd: CInt, at offset: Int64) async throws {
            if delay > .zero { try await Task.sleep(for: delay) }
            let (written, address) = buffer.withUnsafeReadableBytes {
                (pwrite(fd, $0.baseAddress, $0.count, off_t(offset)), UInt(bitPattern: $0.baseAddress))
            }
            guard written == buffer.readableBytes else { throw StoreError.system("pwrite", errno) }
            writes.withLockedValue { $0.append((address, buffer.readableBytes, buffer.capacity)) }
        }
        func sync(_ fd: CInt) async throws {}
        func rename(_ from: String, to: String) async throws {}
        func unlink(_ path: String) async throws {}
        func close(_ fd: CInt) async { _ = Glibc.close(fd) }
        func setAttribute(_ name: String, to value: String, on fd: CInt) async throws {}
        func shutdown() {}
    }

    /// A fill's memory does not grow with its blob: the sink writes every
    /// batch from one of two buffers, whole batches (a chunk that crosses
    /// a batch's end is split), and the file holds the blob's bytes.
    func testAFillWritesEveryBatchFromTwoBuffers() async throws {
        let bytes = FaultInjectionTests.randomBytes(6 * BlobSink.batchSize + 1000)
        let (digest, fill, file, fd) = try sinkTarget("two-buffers", for: bytes)
        defer { Glibc.close(fd) }
        let writer = RecordingWriter()
        let hex = try await UpstreamBody.read(idle: .seconds(5)) { clock in
            // No unfilled batch for a slow moment of the test's machine.
            var sink = BlobSink(writer: writer, fd: fd, fill: fill, clock: clock, algorithm: .sha256,
                                flushAfter: .seconds(3600), startChunkByChunk: false)
            for start in stride(from: 0, to: bytes.count, by: 100_000) {  // not a divisor of a batch
                clock.tick()
                try await sink.append(ByteBuffer(bytes: bytes[start..<min(bytes.count, start + 100_000)]))
            }
            return try await sink.finish()
        }
        XCTAssertEqual(hex, digest.hex)
        XCTAssertEqual(writer.seen.map(\.count), Array(repeating: BlobSink.batchSize, count: 6) + [1000],
                       "six full batches and the rest")
        XCTAssertLessThanOrEqual(Set(writer.seen.map(\.address)).count, 2, "batches reuse the fill's two buffers")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: file)), Data(bytes))
    }

    /// A fill of `bytes` for a sink to pour into, and the open file it writes.
    private func sinkTarget(_ name: String, for bytes: [UInt8]) throws -> (Digest, Fill, path: String, fd: CInt) {
        let digest = try Digest(parsing: FaultInjectionTests.digest(of: bytes))
        let upstream = ProxyConfig.Upstream(host: "h", registry: "127.0.0.1", port: 80, schema: "http", aliases: [])
        let fill = Fill(digest: digest, upstream: upstream, repository: "r", requestHeaders: [:], holdBack: 0)
        let path = try makeTemporaryFolder(name) + "/blob"
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        XCTAssertGreaterThanOrEqual(fd, 0)
        return (digest, fill, path, fd)
    }

    /// A small blob of known length (a manifest, a config) is gathered in a
    /// buffer of its size, not in a whole batch's megabyte.
    func testASmallBlobOfKnownLengthGetsABufferOfItsSize() async throws {
        let bytes = FaultInjectionTests.randomBytes(2000)
        let digest = try Digest(parsing: FaultInjectionTests.digest(of: bytes))
        let upstream = ProxyConfig.Upstream(host: "h", registry: "127.0.0.1", port: 80, schema: "http", aliases: [])
        let folder = try makeTemporaryFolder("small-buffer")
        for length in [nil, Int64(bytes.count)] {
            let fill = Fill(digest: digest, upstream: upstream, repository: "r", requestHeaders: [:], holdBack: 0)
            let fd = Glibc.open(folder + "/blob", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            XCTAssertGreaterThanOrEqual(fd, 0)
            defer { Glibc.close(fd) }
            let writer = RecordingWriter()
            let hex = try await UpstreamBody.read(idle: .seconds(5)) { clock in
                var sink = BlobSink(writer: writer, fd: fd, fill: fill, clock: clock, algorithm: .sha256,
                                    expectedLength: length)
                try await sink.append(ByteBuffer(bytes: bytes))
                return try await sink.finish()
            }
            XCTAssertEqual(hex, digest.hex)
            XCTAssertEqual(writer.seen.map(\.count), [bytes.count])
            if length == nil {
                XCTAssertEqual(writer.seen.first?.capacity, BlobSink.batchSize, "unknown length: a whole batch")
            } else {
                XCTAssertLessThan(writer.seen.first?.capacity ?? .max, 4096, "its own size")
            }
        }
    }

    /// Only a pause puts the sink back to handing chunks on one by one: an
    /// upstream that streams steadily, slower than a batch per `flushAfter`,
    /// gets the body's first megabyte chunk by chunk, then a partial batch
    /// per `flushAfter`, not a write per chunk for the rest of the blob.
    func testASteadyUpstreamIsHandedOnInBatchesAfterItsFirstMegabyte() async throws {
        let chunk = 64 * 1024
        let bytes = FaultInjectionTests.randomBytes(48 * chunk)
        let (digest, fill, file, fd) = try sinkTarget("steady", for: bytes)
        defer { Glibc.close(fd) }
        let writer = RecordingWriter()
        let hex = try await UpstreamBody.read(idle: .seconds(5)) { clock in
            // 64 KiB every 20 ms (3.2 MB/s): ten chunks per `flushAfter`,
            // and no gap near it, even on a loaded machine.
            var sink = BlobSink(writer: writer, fd: fd, fill: fill, clock: clock, algorithm: .sha256,
                                flushAfter: .milliseconds(200))
            for start in stride(from: 0, to: bytes.count, by: chunk) {
                clock.tick()
                try await sink.append(ByteBuffer(bytes: bytes[start..<(start + chunk)]))
                try await Task.sleep(for: .milliseconds(20))
            }
            return try await sink.finish()
        }
        XCTAssertEqual(hex, digest.hex)
        let sizes = writer.seen.map(\.count)
        XCTAssertEqual(Array(sizes.prefix(16)), Array(repeating: chunk, count: 16), "the first megabyte as it comes")
        // 32 chunks in 640 ms: a partial batch every ~10 chunks, not 32 writes.
        XCTAssertLessThanOrEqual(sizes.count - 16, 8, "then batches: \(sizes.dropFirst(16))")
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: file)), Data(bytes))
    }

    /// A cached file the kernel no longer holds in its page cache is read on
    /// the thread pool, not sent by a `sendfile` that would wait for the
    /// disk on the event loop; once warm, it goes by sendfile again. Every
    /// byte either way is the blob's.
    func testACachedBlobNotInThePageCacheIsReadOnTheThreadPool() async throws {
        let (bytes, upstream, proxy, url, path) = try await filledBlob(9_000_000)  // three sendfile regions
        // Counted from here: the fill's own reads are not this test's subject,
        // and a warm hit is one whose pages are all cached when it starts.
        let afterFill = try proxy.metric("cacheproxy_cold_read_bytes_total")
        let fileCached = try resident(path, length: bytes.count)
        XCTAssertEqual(try curl(url).body, Data(bytes), "a warm hit")
        if fileCached {
            XCTAssertEqual(try proxy.metric("cacheproxy_cold_read_bytes_total"), afterFill, "warm: all by sendfile")
        }

        // Written back, then dropped from the page cache (clean pages go).
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
        let evicted = !PageCache.isResident(fd: fd, offset: 0, length: Int64(bytes.count))
        close(fd)
        if !evicted {  // a tmpfs keeps its pages whatever fadvise says: nothing to show there
            await proxy.stop()
            await upstream.stop()
            throw XCTSkip("the temporary folder's file system keeps its pages in memory")
        }

        let beforeCold = try proxy.metric("cacheproxy_cold_read_bytes_total")
        let cold = try curl(url)
        XCTAssertEqual(cold.code, 200)
        XCTAssertTrue(cold.body == Data(bytes), "every byte, read from disk")
        let coldBytes = try proxy.metric("cacheproxy_cold_read_bytes_total")
        // All of it: the regions the readahead of the pool's reads brings
        // in were not cached when the answer found its first cold region,
        // so they are not trusted to `sendfile` (their pages may be in flight).
        XCTAssertEqual(coldBytes - beforeCold, Double(bytes.count))
        XCTAssertTrue(try curl(url, ["-H", "Range: bytes=100-"]).body == Data(bytes[100...]), "warm again, a range")
        XCTAssertEqual(try proxy.metric("cacheproxy_cold_read_bytes_total"), coldBytes, "warm again: by sendfile")
        XCTAssertEqual(upstream.gets.count, 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// A warm file with holes (a few pages taken by proactive reclaim, as
    /// DAMON's `pageout` does on the dev VM) has the regions with holes read
    /// on the pool and the others sent by `sendfile`, also between two
    /// holes: before, one reclaimed page turned the rest of a large answer
    /// into a copy through memory.
    func testHolesInAWarmFileCostTheirRegionsOnThePool() async throws {
        let region = Int(ResponseChannel.maxRegion)
        let (bytes, upstream, proxy, url, path) = try await filledBlob(8 * region)
        XCTAssertEqual(try curl(url).body, Data(bytes), "a warm hit")

        // The second and fourth regions' pages dropped, the others kept.
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(fsync(fd), 0)
        for hole in [1, 3] {
            XCTAssertEqual(posix_fadvise(fd, off_t(hole * region), off_t(region), POSIX_FADV_DONTNEED), 0)
        }
        let cached = (0..<8).map { PageCache.isResident(fd: fd, offset: Int64($0 * region), length: Int64(region)) }
        close(fd)
        if cached != [true, false, true, false, true, true, true, true] {
            await proxy.stop()
            await upstream.stop()
            throw XCTSkip("the page cache did not keep exactly the warm regions (a tmpfs, or reclaim): \(cached)")
        }

        let before = try proxy.metric("cacheproxy_cold_read_bytes_total")
        XCTAssertTrue(try curl(url).body == Data(bytes), "every byte")
        XCTAssertEqual(try proxy.metric("cacheproxy_cold_read_bytes_total") - before, Double(2 * region),
                       "the two regions with holes on the pool, the six others by sendfile")
        await proxy.stop()
        await upstream.stop()
    }

    /// A blob of `size` random bytes from a fake upstream, fetched once
    /// through a new proxy (the fill); its URL and cache file.
    private func filledBlob(_ size: Int) async throws
        -> (bytes: [UInt8], upstream: FakeUpstream, proxy: TestProxy, url: String, path: String) {
        typealias F = FaultInjectionTests
        let bytes = F.randomBytes(size)
        let upstream = try await FakeUpstream { _ in .init(body: bytes) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let digest = try Digest(parsing: F.digest(of: bytes))
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        XCTAssertEqual(try curl(url).body, Data(bytes), "the fill")
        return (bytes, upstream, proxy, url, proxy.folder + "/blobs/sha256/\(digest.hex.prefix(2))/\(digest.hex)")
    }

    private func resident(_ path: String, length: Int) throws -> Bool {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw StoreError.system("open", errno) }
        defer { close(fd) }
        return PageCache.isResident(fd: fd, offset: 0, length: Int64(length))
    }
}
