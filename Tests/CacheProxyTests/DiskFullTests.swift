@testable import CacheProxy
import Foundation
import NIOCore
import NIOHTTP1
import XCTest

/// A cache folder on a small tmpfs mounted by the test: a full disk during a
/// fill costs the cache its copy, never a client its bytes.
final class DiskFullTests: XCTestCase {
    typealias F = FaultInjectionTests
    private var mountPoint: String?

    /// A fresh tmpfs of `size` for the cache folder. The suite runs as root
    /// (`make test` installs packages); without the right to mount, the test
    /// fails rather than pass untested.
    private func smallDisk(_ size: String) throws -> String {
        let folder = try makeTemporaryFolder("full")
        let (status, output) = try shell("mount", ["-t", "tmpfs", "-o", "size=\(size)", "tmpfs", folder])
        guard status == 0 else { throw TestError("cannot mount a tmpfs (run the suite as root): \(output)") }
        mountPoint = folder
        return folder
    }

    override func tearDown() {
        if let mountPoint { _ = try? shell("umount", ["-l", mountPoint]) }
        super.tearDown()
    }

    private func start(_ upstream: FakeUpstream, on disk: String, extraYAML: String = "") async throws -> TestProxy {
        try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port), folder: disk + "/cache", extraYAML: extraYAML)
    }

    /// A fake upstream answering `reply`, and a proxy whose cache is on a
    /// new tmpfs of `size`.
    private func onSmallDisk(_ size: String, extraYAML: String = "",
                             _ reply: @escaping @Sendable (HTTPRequestHead) -> FakeUpstream.Reply) async throws
        -> (FakeUpstream, TestProxy) {
        let disk = try smallDisk(size)
        let upstream = try await FakeUpstream(reply)
        return (upstream, try await start(upstream, on: disk, extraYAML: extraYAML))
    }

    /// A raw client that sends a GET for `digest` and then reads at its own pace.
    private func rawGet(_ proxy: TestProxy, _ digest: String, close: Bool = false) throws -> SlowReader {
        let reader = try SlowReader(port: proxy.port)
        let connection = close ? "Connection: close\r\n" : ""
        XCTAssertTrue(reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\(connection)\r\n"))
        return reader
    }

    /// Without a disk, a trickling upstream's batches go to the memory
    /// window unfilled (each flushed after a short wait). The window's bound
    /// counts bytes, so it must not keep each one's whole buffer: 20 batches
    /// of 10 KB gathered in 1 MiB buffers would be 20 MiB behind a "200 KB".
    func testPartialBatchesInTheMemoryWindowKeepOnlyTheirBytes() async throws {
        let bytes = F.randomBytes(200_000)
        let digest = try Digest(parsing: F.digest(of: bytes))
        let upstream = ProxyConfig.Upstream(host: "h", registry: "127.0.0.1", port: 80, schema: "http", aliases: [])
        let fill = Fill(digest: digest, upstream: upstream, repository: "r", requestHeaders: [:], holdBack: 0)
        let writer = SlowDiskTests.RecordingWriter()
        let hex = try await UpstreamBody.read(idle: .seconds(5)) { clock in
            // No file (the disk failed at once); every chunk flushed.
            var sink = BlobSink(writer: writer, fd: nil, fill: fill, clock: clock, algorithm: .sha256,
                                flushAfter: .zero)
            for start in stride(from: 0, to: bytes.count, by: 10_000) {
                clock.tick()
                try await sink.append(ByteBuffer(bytes: bytes[start..<(start + 10_000)]))
            }
            return try await sink.finish()
        }
        XCTAssertEqual(hex, digest.hex)
        XCTAssertTrue(writer.seen.isEmpty, "nothing went to a file")
        let (held, retained) = fill.windowMemory
        XCTAssertEqual(held, bytes.count, "no follower came: the window holds every byte")
        XCTAssertLessThanOrEqual(retained, 2 * held, "and not much more memory than that")
    }

    /// 12 MB through a 4 MiB disk, to three clients at once: each gets every
    /// byte, verified; the disk keeps nothing.
    func testAFillLargerThanTheDiskServesEveryClientAndKeepsNothing() async throws {
        let bytes = F.randomBytes(12_000_000)
        let (upstream, proxy) = try await onSmallDisk("4m") { _ in .init(body: bytes, chunkSize: 256 * 1024, delay: .milliseconds(5)) }
        let url = "\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))"
        for got in try curlAtOnce(url, count: 3) {
            XCTAssertEqual(got.exit, 0)
            XCTAssertEqual(got.code, 200)
            XCTAssertEqual(got.body.count, bytes.count)
            XCTAssertTrue(got.body == Data(bytes), "verified bytes, from disk then memory")
        }
        XCTAssertEqual(upstream.gets.count, 1, "one fill for all three")
        XCTAssertTrue(eventually { proxy.files(in: "tmp").isEmpty }, "nothing partial kept")
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(try proxy.metric(#"cacheproxy_fill_errors_total{reason="enospc"}"#), 1)
        XCTAssertEqual(try proxy.metric("cacheproxy_cache_entries"), 0)
        await proxy.stop()
        await upstream.stop()
    }

    /// From memory as from disk, a body that does not match its digest ends
    /// as a cut connection, never a complete answer.
    func testWrongBytesFromMemoryAreStillNeverAComplete200() async throws {
        let bytes = F.randomBytes(6_000_000)
        let (upstream, proxy) = try await onSmallDisk("2m") { _ in .init(body: Array(bytes.reversed())) }
        let got = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))")
        XCTAssertNotEqual(got.exit, 0, "cut")
        XCTAssertLessThan(got.body.count, bytes.count)
        XCTAssertEqual(try proxy.metric("cacheproxy_digest_mismatches_total"), 1)
        XCTAssertTrue(eventually { proxy.files(in: "tmp").isEmpty })
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        await proxy.stop()
        await upstream.stop()
    }

    /// A full disk does not stop the hits, and the cache stores again once
    /// space returns.
    func testHitsGoOnAndTheCacheRecoversWhenSpaceReturns() async throws {
        let disk = try smallDisk("8m")
        let small = F.randomBytes(100_000)
        let large = F.randomBytes(500_000)
        let byDigest = [F.digest(of: small): small, F.digest(of: large): large]
        let upstream = try await FakeUpstream { head in
            .init(body: byDigest[String(head.uri.split(separator: "/").last ?? "")] ?? [])
        }
        let proxy = try await start(upstream, on: disk)
        let smallURL = "\(proxy.base)/v2/a/blobs/\(F.digest(of: small))"
        let largeURL = "\(proxy.base)/v2/a/blobs/\(F.digest(of: large))"
        XCTAssertEqual(try curl(smallURL).body, Data(small))
        let smallDigest = try Digest(parsing: F.digest(of: small))
        XCTAssertTrue(eventually { proxy.server.store.size(of: smallDigest) != nil })

        // Fill the disk to the last block.
        let filler = disk + "/filler"
        let (status, _) = try shell("dd", ["if=/dev/zero", "of=\(filler)", "bs=64k"])
        XCTAssertNotEqual(status, 0, "dd stops at ENOSPC")
        XCTAssertEqual(try curl(largeURL).body, Data(large), "served from memory")
        XCTAssertTrue(try eventually { try proxy.metric(#"cacheproxy_fill_errors_total{reason="enospc"}"#) == 1 })
        XCTAssertEqual(try curl(smallURL).body, Data(small), "a hit, disk full or not")
        XCTAssertEqual(upstream.gets.filter { $0.uri.hasSuffix(F.digest(of: small)) }.count, 1)

        try FileManager.default.removeItem(atPath: filler)
        XCTAssertEqual(try curl(largeURL).body, Data(large))
        let largeDigest = try Digest(parsing: F.digest(of: large))
        XCTAssertTrue(eventually { proxy.server.store.size(of: largeDigest) == 500_000 }, "stored again")
        XCTAssertEqual(try curl(largeURL).body, Data(large))
        XCTAssertEqual(upstream.gets.filter { $0.uri.hasSuffix(F.digest(of: large)) }.count, 2)
        XCTAssertTrue(eventually { proxy.files(in: "tmp").isEmpty })
        await proxy.stop()
        await upstream.stop()
    }

    /// A client of a short range waits for the digest before its last byte;
    /// it must not hold the memory window shut meanwhile (which would stall
    /// the fill until `upstream_idle` cut everyone).
    func testAShortRangeFromMemoryDoesNotStallTheFill() async throws {
        let bytes = F.randomBytes(12_000_000)
        let (upstream, proxy) = try await onSmallDisk("2m", extraYAML: "timeouts: {upstream_idle: 2}") { _ in .init(body: bytes, chunkSize: 256 * 1024, delay: .milliseconds(5)) }
        let url = "\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))"
        async let range = Task.detached { try curl(url, ["-H", "Range: bytes=0-1000"]) }.value
        try await Task.sleep(for: .milliseconds(50))
        let whole = try curl(url)
        let ranged = try await range
        XCTAssertEqual(ranged.code, 206)
        XCTAssertEqual(ranged.body, Data(bytes[0...1000]))
        XCTAssertEqual(whole.exit, 0)
        XCTAssertTrue(whole.body == Data(bytes))
        XCTAssertEqual(try proxy.metric("cacheproxy_fill_failures_total"), 0)
        await proxy.stop()
        await upstream.stop()
    }

    /// A slow client sets the pace of a fill from memory; the time the fill
    /// waits for it (here a 2.5 s pause, well within the send timeout) is
    /// not the upstream's idle time.
    func testASlowClientFromMemoryIsNotTakenForAnIdleUpstream() async throws {
        // Large enough that the pause outlasts what socket buffers and the
        // window can absorb: the fill has to wait for the client.
        let bytes = F.randomBytes(30_000_000)
        let (upstream, proxy) = try await onSmallDisk("2m", extraYAML: "timeouts: {upstream_idle: 1}") { _ in .init(body: bytes) }
        let reader = try rawGet(proxy, F.digest(of: bytes), close: true)
        let first = reader.read(bytesPerSecond: 4_000_000, limit: 1_000_000, deadline: 10)
        try await Task.sleep(for: .milliseconds(2500))
        let rest = reader.read(bytesPerSecond: 1 << 30, deadline: 30)
        reader.close()
        let all = first.bytes + rest.bytes
        let result = SlowReadResult(bytes: all, closedByPeer: rest.closedByPeer, seconds: 0)
        XCTAssertEqual(result.statusCode, 200)
        XCTAssertTrue(result.body == bytes, "got \(result.body.count) of \(bytes.count) bytes")
        XCTAssertEqual(try proxy.metric("cacheproxy_fill_failures_total"), 0)
        await proxy.stop()
        await upstream.stop()
    }

    /// With no disk and no client left, a fill has nobody to download for:
    /// it stops instead of fetching the rest into nowhere.
    func testAFillFromMemoryStopsWhenItsLastClientLeaves() async throws {
        let bytes = F.randomBytes(16_000_000)
        let (upstream, proxy) = try await onSmallDisk("2m") { _ in .init(body: bytes, chunkSize: 256 * 1024, delay: .milliseconds(60)) }
        let url = "\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))"
        let left = try curl(url, ["--max-time", "1"])
        XCTAssertNotEqual(left.exit, 0, "the client gave up after 1 s of a ~4 s download")
        XCTAssertTrue(try eventually(within: 1.5) { try proxy.metric("cacheproxy_fills_in_flight") == 0 },
                      "the fill stopped long before the upstream's end")
        XCTAssertEqual(try proxy.metric("cacheproxy_fill_failures_total"), 1)
        XCTAssertTrue(eventually { proxy.files(in: "tmp").isEmpty })
        await proxy.stop()
        await upstream.stop()
    }

    /// From memory, a client that stops reading holds the window shut only
    /// until the send timeout cuts it; a client that started with it gets
    /// the whole blob, verified.
    func testAStalledClientFromMemoryIsCutByTheSendTimeoutAndTheOtherFinishes() async throws {
        let bytes = F.randomBytes(30_000_000)
        let (upstream, proxy) = try await onSmallDisk("2m", extraYAML: "timeouts: {send: 1, upstream_idle: 10}") { _ in .init(body: bytes) }
        let url = "\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))"
        let stalled = try rawGet(proxy, F.digest(of: bytes))
        let started = Date()
        let fast = Task.detached { try curl(url) }
        _ = stalled.read(bytesPerSecond: 1 << 30, limit: 100_000, deadline: 5)  // then nothing for 3 s
        try await Task.sleep(for: .seconds(3))
        let rest = stalled.read(bytesPerSecond: 1 << 30, deadline: 5)
        stalled.close()
        XCTAssertTrue(rest.closedByPeer, "the stalled client was cut")
        XCTAssertLessThan(100_000 + rest.bytes.count, bytes.count)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_client_timeouts_total{kind="send"}"#), 1)
        let got = try await fast.value
        XCTAssertEqual(got.exit, 0)
        XCTAssertTrue(got.body == Data(bytes), "the whole blob, verified")
        XCTAssertLessThan(Date().timeIntervalSince(started), 8)
        await proxy.stop()
        await upstream.stop()
    }

    /// From memory as from disk, an upstream that stalls past
    /// `upstream_idle` fails the fill: its clients are cut, nothing is kept.
    func testAnUpstreamStallingPastItsIdleTimeoutFromMemoryCutsTheClients() async throws {
        let bytes = F.randomBytes(8_000_000)
        let (upstream, proxy) = try await onSmallDisk("2m", extraYAML: "timeouts: {upstream_idle: 1}") { _ in .init(body: bytes, stallAfter: 5_000_000, stallFor: .seconds(4)) }
        let started = Date()
        let got = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))")
        XCTAssertNotEqual(got.exit, 0, "cut, not complete")
        XCTAssertLessThan(got.body.count, bytes.count)
        XCTAssertLessThan(Date().timeIntervalSince(started), 3.5, "cut at the idle timeout, not at the stall's end")
        XCTAssertTrue(try eventually { try proxy.metric("cacheproxy_fill_failures_total") == 1 })
        XCTAssertTrue(eventually { proxy.files(in: "tmp").isEmpty })
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        await proxy.stop()
        await upstream.stop()
    }
}
