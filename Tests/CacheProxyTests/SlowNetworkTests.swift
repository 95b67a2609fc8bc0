import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import XCTest
@testable import CacheProxy
#if canImport(Glibc)
import Glibc
#endif

/// Transfers that take longer than every timeout, and stalls that are cut by
/// exactly one of them. Every timeout is 1 s here, so a transfer of a few
/// seconds stands for a 1 GB layer over a slow link: each one runs both
/// above a timeout (it moves, so it must finish) and below it (it stops, so
/// it must be cut).
final class SlowNetworkTests: XCTestCase {
    static let shortTimeouts =
        "timeouts: {header_read: 1, idle: 2, request_body: 1, send: 1, upstream: 1, upstream_idle: 1, shutdown: 2}"

    typealias F = FaultInjectionTests

    private func start(timeouts: String = shortTimeouts,
                       _ reply: @escaping @Sendable (HTTPRequestHead) -> FakeUpstream.Reply) async throws
        -> (FakeUpstream, TestProxy) {
        let upstream = try await FakeUpstream(reply)
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: timeouts)
        return (upstream, proxy)
    }

    private func stop(_ upstream: FakeUpstream, _ proxy: TestProxy) async {
        await proxy.stop()
        await upstream.stop()
    }

    /// A blob made, fetched once through the proxy (so it is a hit), and its digest.
    private func cachedBlob(size: Int, timeouts: String = shortTimeouts) async throws
        -> (FakeUpstream, TestProxy, [UInt8], String) {
        let bytes = F.randomBytes(size)
        let (upstream, proxy) = try await start(timeouts: timeouts) { _ in .init(body: bytes, chunkSize: 1 << 20) }
        let digest = F.digest(of: bytes)
        let first = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(first.body.count, size)
        let parsed = try Digest(parsing: digest)
        XCTAssertTrue(eventually { proxy.server.store.size(of: parsed) != nil })
        return (upstream, proxy, bytes, digest)
    }

    /// Sends a chunked `PATCH` of an upload session at a fixed rate,
    /// stopping after `stopAfter` bytes (no last chunk) when given.
    private func chunkedPatch(_ uploader: SlowUploader, body: [UInt8], bytesPerSecond: Int, stopAfter: Int? = nil) -> Bool {
        uploader.upload(head: "PATCH /v2/a/blobs/uploads/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                        body: body, bytesPerSecond: bytesPerSecond, chunked: true, stopAfter: stopAfter)
    }

    // MARK: client reads slowly

    func testLargeHitToASlowReaderOutlastsEveryTimeout() async throws {
        // 6 MiB at 1.5 MB/s through a 4 KiB receive buffer: ~4 s, four times
        // every timeout. On the old main the head deadline cut it at ~1 s.
        let (upstream, proxy, bytes, digest) = try await cachedBlob(size: 6 << 20)
        let reader = try SlowReader(port: proxy.port, receiveBuffer: 4096)
        reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let result = reader.read(bytesPerSecond: 1_500_000, deadline: 30)
        XCTAssertEqual(result.statusCode, 200, result.head)
        XCTAssertGreaterThan(result.seconds, 3, "the read really was slow")
        XCTAssertEqual(result.body.count, bytes.count)
        XCTAssertTrue(result.body == bytes, "every byte, in order")
        XCTAssertEqual(try proxy.metric("cacheproxy_client_timeouts_total{kind=\"send\"}"), 0)
        await stop(upstream, proxy)
    }

    func testCurlWithARateLimitGetsTheWholeHit() async throws {
        // curl paces by average: it takes what the loopback socket buffers
        // hold (~10 MB) at once, then reads nothing for up to ~1.7 s to get
        // back to its rate. That pause is a real stall, so here the send
        // timeout is 3 s; the transfer (3-5 s) outlasts the head and idle
        // deadlines (1 s) many times over.
        let (upstream, proxy, bytes, digest) = try await cachedBlob(
            size: 32 << 20, timeouts: "timeouts: {header_read: 1, idle: 1, send: 3}")
        let started = Date()
        let result = try curl("\(proxy.base)/v2/a/blobs/\(digest)", ["--limit-rate", "6M"])
        XCTAssertEqual(result.exit, 0)
        XCTAssertGreaterThan(Date().timeIntervalSince(started), 2)
        XCTAssertTrue(Array(result.body) == bytes)
        await stop(upstream, proxy)
    }

    func testAClientThatNeverReadsIsCutByTheSendTimeout() async throws {
        let (upstream, proxy, bytes, digest) = try await cachedBlob(size: 32 << 20)
        func openBlobFiles() -> Int { Self.descriptors(under: proxy.folder + "/blobs/") }
        let before = openBlobFiles()
        let reader = try SlowReader(port: proxy.port, receiveBuffer: 4096)
        reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try await Task.sleep(for: .milliseconds(500))
        XCTAssertEqual(openBlobFiles(), before + 1, "the warm file is being sent, region after region, from the loop")
        try await Task.sleep(for: .milliseconds(2500))  // send is 1 s: cut by now
        XCTAssertEqual(try proxy.metric("cacheproxy_client_timeouts_total{kind=\"send\"}"), 1)
        let rest = reader.read(bytesPerSecond: 1 << 30, deadline: 10)
        XCTAssertTrue(rest.closedByPeer)
        XCTAssertLessThan(rest.body.count, bytes.count, "cut, not completed")
        // The regions queued behind the stalled one failed with it, and the
        // file was closed once the last of them was over.
        XCTAssertTrue(eventually { openBlobFiles() == before }, "\(openBlobFiles()) blob files open, \(before) before")
        await stop(upstream, proxy)
    }

    /// This process's descriptors open on files under `folder`.
    static func descriptors(under folder: String) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { fd in
            ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? "").hasPrefix(folder)
        }.count
    }

    func testAClientThatNeverReadsASmallAnswerIsCutToo() async throws {
        // 60 KB from the small-blob memory cache to a client with a tiny
        // receive buffer that never reads. Whether the bytes stick in the
        // proxy's queue (below NIO's high-water mark, so the channel stays
        // writable: the send timeout must still watch an unfinished
        // response) or in the kernel's buffers (the response is finished:
        // the idle timeout), the connection must not be held.
        let (upstream, proxy, _, digest) = try await cachedBlob(size: 60_000)
        let reader = try SlowReader(port: proxy.port, receiveBuffer: 1024)
        reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try await Task.sleep(for: .seconds(3))
        let send = try proxy.metric("cacheproxy_client_timeouts_total{kind=\"send\"}")
        let idle = try proxy.metric("cacheproxy_client_timeouts_total{kind=\"idle\"}")
        XCTAssertEqual(send + idle, 1, "closed by one of the two")
        XCTAssertTrue(reader.waitForPeerClose(timeout: 2))
        await stop(upstream, proxy)
    }

    func testASlowReaderOfAFillIsNotCutAndTheFillIsNotSlowed() async throws {
        // The upstream trickles 2 MB over ~2 s (above upstream_idle, each
        // pause below it); the client reads at 400 KB/s (~5 s, above send).
        let bytes = F.randomBytes(2_000_000)
        let digest = F.digest(of: bytes)
        let (upstream, proxy) = try await start { _ in .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(100)) }
        let reader = try SlowReader(port: proxy.port, receiveBuffer: 4096)
        reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let result = reader.read(bytesPerSecond: 400_000, deadline: 30)
        XCTAssertEqual(result.statusCode, 200)
        XCTAssertTrue(result.body == bytes)
        XCTAssertGreaterThan(result.seconds, 4)
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 })
        await stop(upstream, proxy)
    }

    func testASteadyReaderOfAMissIsNeverCutByTheSendTimeout() async throws {
        // A follower hands down one file region after another. Read at
        // just under 4 MiB per tick of the send timeout (a quarter of it: 1 s
        // here), the queue of unwritten bytes is a little larger at each look
        // although bytes flow all the time: progress must be bytes written,
        // not the queue shrinking.
        let bytes = F.randomBytes(24 << 20)
        let digest = F.digest(of: bytes)
        let (upstream, proxy) = try await start(
            timeouts: "timeouts: {header_read: 1, idle: 1, send: 4, upstream: 1, upstream_idle: 1}"
        ) { _ in .init(body: bytes, chunkSize: 1 << 20) }
        let reader = try SlowReader(port: proxy.port, receiveBuffer: 1 << 20)
        reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let result = reader.read(bytesPerSecond: 3_900_000, deadline: 30)
        XCTAssertEqual(result.body.count, bytes.count, "cut after \(result.seconds) s")
        XCTAssertEqual(try proxy.metric("cacheproxy_client_timeouts_total{kind=\"send\"}"), 0)
        await stop(upstream, proxy)
    }

    func testASlowPassThroughToASlowReaderOutlastsEveryTimeout() async throws {
        // A pass-through body (not a blob: nothing is cached) that the
        // upstream trickles for ~2 s and the client reads at 400 KB/s (~5 s):
        // longer than upstream_idle and send (1 s) while it moves, and the
        // time the proxy waits on the slow client is not the upstream's.
        let bytes = F.randomBytes(2_000_000)
        let (upstream, proxy) = try await start { _ in
            .init(headers: ["content-type": "application/vnd.oci.image.index.v1+json"], body: bytes,
                  chunkSize: 100_000, delay: .milliseconds(100))
        }
        let reader = try SlowReader(port: proxy.port, receiveBuffer: 4096)
        reader.send("GET /v2/a/manifests/big HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let result = reader.read(bytesPerSecond: 400_000, deadline: 30)
        XCTAssertEqual(result.statusCode, 200, result.head)
        XCTAssertGreaterThan(result.seconds, 4)
        XCTAssertTrue(result.body == bytes, "every byte, in order")
        XCTAssertEqual(proxy.files(in: "blobs"), [], "a pass-through stores nothing")
        await stop(upstream, proxy)
    }

    func testAFastReaderOfAWarmBlobLeavesItsLoopToTheOthers() async throws {
        // One event loop for every connection. A client that reads a warm
        // 64 MiB blob as fast as the kernel sends it takes each 4 MiB region
        // at once; 4 KiB hits asked on another connection meanwhile must
        // still be answered while it reads, not after (a loop that chained
        // the regions without polling its selector answered none).
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Patterned, not random: random bytes at this size cost the test seconds.
        var big = [UInt8](repeating: 0, count: 64 << 20)
        for page in stride(from: 0, to: big.count, by: 4096) { big[page] = UInt8(truncatingIfNeeded: page >> 12) }
        let small = F.randomBytes(4096)
        let (bigDigest, smallDigest) = (F.digest(of: big), F.digest(of: small))
        let upstream = try await FakeUpstream { [big] head in
            .init(body: head.uri.hasSuffix(bigDigest) ? big : small, chunkSize: 1 << 20)
        }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            eventLoops: loop)
        for digest in [bigDigest, smallDigest] {
            XCTAssertEqual(try curl("\(proxy.base)/v2/a/blobs/\(digest)", ["-o", "/dev/null"]).exit, 0)
            let parsed = try Digest(parsing: digest)
            XCTAssertTrue(eventually { proxy.server.store.size(of: parsed) != nil })
        }
        // Each used by one thread of its own only.
        nonisolated(unsafe) let reader = try RawSocket(port: proxy.port)
        var size: Int32 = 8 << 20
        setsockopt(reader.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        nonisolated(unsafe) let prober = try RawSocket(port: proxy.port)
        let times = NIOLockedValueBox<(first: Date?, last: Date?, body: Int, answers: [(Date, Date)])>((nil, nil, 0, []))
        let done = DispatchSemaphore(value: 0)
        Thread {
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var body = -1
            while true {
                let n = recv(reader.fd, &buffer, buffer.count, 0)
                if n < 0, errno == EINTR { continue }
                guard n > 0 else { break }
                if body < 0 { times.withLockedValue { $0.first = Date() }; body = 0 }
                body += n
            }
            times.withLockedValue { $0.last = Date(); $0.body = body }
            done.signal()
        }.start()
        let probing = Thread {
            let request = "GET /v2/a/blobs/\(smallDigest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            while times.withLockedValue({ $0.last == nil }) {
                let sent = Date()
                prober.send(request)
                guard prober.receiveHead().hasPrefix("HTTP/1.1 200"), prober.receive(limit: 4096).count == 4096 else { return }
                times.withLockedValue { $0.answers.append((sent, Date())) }
            }
        }
        probing.start()
        reader.send("GET /v2/a/blobs/\(bigDigest) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        XCTAssertEqual(done.wait(timeout: .now() + 30), .success)
        let (first, last, body, answers) = times.withLockedValue { $0 }
        XCTAssertGreaterThan(body, big.count, "the whole blob and its head")
        if let first, let last {
            let during = answers.filter { $0.0 > first && $0.1 < last }.count
            XCTAssertGreaterThanOrEqual(during, 3, "hits answered while \(last.timeIntervalSince(first)) s of blob went out")
        } else {
            XCTFail("no blob")
        }
        await stop(upstream, proxy)
        try await loop.shutdownGracefully()
    }

    func testManyReadersOfOneWarmBlobOnOneLoopEachGetItWhole() async throws {
        // A CI farm's fan-out on one event loop, under the short timeouts:
        // nine clients ask for the same warm 24 MiB layer at once, so the
        // regions of all their answers are in flight together. Seven read
        // at full speed, one at 12 MB/s (slower than the rest and longer
        // than every timeout, but never idle for one), one leaves after
        // its first MiB while the others read. Each whole reader gets every
        // byte right, and no blob file stays open afterwards.
        let loop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // Each page carries its own number: a region sent twice, skipped or
        // read at a wrong offset changes the digest (random bytes at this
        // size would cost the test seconds).
        var big = [UInt8](repeating: 0, count: 24 << 20)
        for page in stride(from: 0, to: big.count, by: 4096) {
            withUnsafeBytes(of: UInt32(page >> 12 + 1).littleEndian) { big.replaceSubrange(page..<page + 4, with: $0) }
        }
        let digest = F.digest(of: big)
        let upstream = try await FakeUpstream { [big] _ in .init(body: big, chunkSize: 1 << 20) }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: Self.shortTimeouts, eventLoops: loop)
        let url = "\(proxy.base)/v2/a/blobs/\(digest)"
        XCTAssertEqual(try curl(url).exit, 0)
        let parsed = try Digest(parsing: digest)
        XCTAssertTrue(eventually { proxy.server.store.size(of: parsed) != nil })
        func openBlobFiles() -> Int { Self.descriptors(under: proxy.folder + "/blobs/") }
        XCTAssertTrue(eventually { openBlobFiles() == 0 })

        let leaver = try RawSocket(port: proxy.port)
        XCTAssertTrue(leaver.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        XCTAssertGreaterThan(leaver.receive(limit: 1 << 20).count, 0)
        let answers = NIOLockedValueBox<(slow: (exit: Int32, body: Data, code: Int)?,
                                         fast: [(exit: Int32, body: Data, code: Int)])>((nil, []))
        let finished = DispatchSemaphore(value: 0)
        Thread {
            let slow = try? curl(url, ["--limit-rate", "12M"])
            answers.withLockedValue { $0.slow = slow }
            finished.signal()
        }.start()
        Thread {
            let fast = (try? curlAtOnce(url, count: 7)) ?? []
            answers.withLockedValue { $0.fast = fast }
            finished.signal()
        }.start()
        // Gone while the others read.
        try await Task.sleep(for: .milliseconds(100))
        leaver.close()
        XCTAssertEqual(finished.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(finished.wait(timeout: .now() + 30), .success)
        let (slow, fast) = answers.withLockedValue { $0 }
        XCTAssertNotNil(slow, "the slow reader finished")
        XCTAssertEqual(fast.count, 7, "the fast readers finished")
        for (index, answer) in (fast + [slow].compactMap { $0 }).enumerated() {
            XCTAssertEqual(answer.exit, 0, "reader \(index)")
            XCTAssertEqual(answer.code, 200, "reader \(index)")
            XCTAssertEqual(answer.body.count, big.count, "reader \(index)")
            XCTAssertEqual(F.digest(of: [UInt8](answer.body)), digest, "reader \(index): every byte right")
        }
        XCTAssertTrue(eventually { openBlobFiles() == 0 }, "\(openBlobFiles()) blob files left open")
        await stop(upstream, proxy)
        try await loop.shutdownGracefully()
    }

    func testACachedFileCutShortUnderAReaderEndsItsAnswerAtOnce() async throws {
        // Something outside the proxy truncates a cached blob's file while
        // a slow client reads it. `sendfile` then meets the file's end
        // before the region's and sends nothing, and NIO tries again at
        // every writable event: the loop spun, a core busy, until the send
        // timeout (10 s here, a minute by default). The answer must end
        // within a second or so instead (the client sees it short), and a
        // new request for the blob gets it whole and right or visibly cut.
        let (upstream, proxy, bytes, digest) = try await cachedBlob(
            size: 16 << 20,
            timeouts: "timeouts: {header_read: 5, idle: 20, request_body: 5, send: 10, upstream: 5, upstream_idle: 5, shutdown: 2}")
        let file = proxy.server.store.path(for: try Digest(parsing: digest))
        XCTAssertEqual((try FileManager.default.attributesOfItem(atPath: file)[.size] as? Int), bytes.count)
        let reader = try RawSocket(port: proxy.port)
        var size: Int32 = 64 << 10
        setsockopt(reader.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        XCTAssertTrue(reader.send("GET /v2/a/blobs/\(digest) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        XCTAssertTrue(reader.receiveHead().hasPrefix("HTTP/1.1 200"))
        var received = reader.receive(limit: 1 << 20).count
        XCTAssertGreaterThanOrEqual(received, 1 << 20)
        XCTAssertEqual(truncate(file, 2 << 20), 0)
        let cpuBefore = Self.processCPUSeconds()
        let cut = Date()
        while true {
            let chunk = reader.receive(limit: 256 << 10)
            if chunk.isEmpty { break }
            received += chunk.count
        }
        let took = Date().timeIntervalSince(cut)
        let cpu = Self.processCPUSeconds() - cpuBefore
        XCTAssertLessThan(received, bytes.count, "the answer ends short")
        XCTAssertLessThan(took, 3, "ended within a second or so, not at the send timeout")
        XCTAssertLessThan(cpu, 3, "no longer than that spent spinning")
        // Asked again: whole and right, or visibly cut; never short as if whole.
        let again = try curl("\(proxy.base)/v2/a/blobs/\(digest)", ["--max-time", "10"])
        if again.exit == 0 {
            XCTAssertEqual(again.code, 200)
            XCTAssertEqual(F.digest(of: [UInt8](again.body)), digest)
        }
        await stop(upstream, proxy)
    }

    /// This process's user and system CPU seconds so far.
    static func processCPUSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec)
            + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }

    // MARK: upstream stalls

    func testAnUpstreamPauseShorterThanTheIdleTimeoutIsWaitedFor() async throws {
        let bytes = F.randomBytes(1_000_000)
        let (upstream, proxy) = try await start { _ in
            .init(body: bytes, chunkSize: 100_000, stallAfter: 300_000, stallFor: .milliseconds(500))
        }
        let result = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))")
        XCTAssertEqual(result.exit, 0)
        XCTAssertTrue(Array(result.body) == bytes)
        await stop(upstream, proxy)
    }

    /// An upstream that trickles (100 KB every 500 ms, each gap below
    /// `upstream_idle`) reaches its client chunk by chunk, not a write batch
    /// (1 MiB, more than this blob) at a time, nor a chunk or two late: the
    /// first 300 KB the client may have (all but the 64 KiB held back until
    /// the digest) are there by the fourth chunk (1.5 s), not the fifth.
    func testATricklingUpstreamReachesItsClientAsItComes() async throws {
        let bytes = F.randomBytes(600_000)
        try await expectEarly(300_000, of: bytes, within: 1.8, "300 KB by the fourth chunk (1.5 s), not the fifth (2 s)",
                              from: .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(500)))
    }

    /// Fetches `bytes` from an upstream answering `reply`: the client must
    /// hold `count` bytes within `seconds` of asking (`why`), then every byte.
    private func expectEarly(_ count: Int, of bytes: [UInt8], within seconds: TimeInterval, _ why: String,
                             timeouts: String = shortTimeouts, from reply: FakeUpstream.Reply) async throws {
        let (upstream, proxy) = try await start(timeouts: timeouts) { _ in reply }
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        let started = Date()
        XCTAssertTrue(socket.send("GET /v2/a/blobs/\(F.digest(of: bytes)) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        XCTAssertTrue(socket.receiveHead().hasPrefix("HTTP/1.1 200"))
        let early = socket.receive(limit: count)
        XCTAssertGreaterThanOrEqual(early.count, count)
        XCTAssertLessThan(Date().timeIntervalSince(started), seconds, why)
        let rest = socket.receive(limit: bytes.count - early.count)
        XCTAssertTrue(early + rest == bytes, "every byte, verified")
        socket.close()
        await stop(upstream, proxy)
    }

    /// For an upstream that pauses longer than `upstream_idle: 1` allows.
    static let patientTimeouts = shortTimeouts.replacingOccurrences(of: "upstream_idle: 1", with: "upstream_idle: 3")

    /// An upstream that sends a burst per pause (200 KB every 800 ms, which
    /// the socket delivers in several reads): each whole burst reaches the
    /// client before the next, not its first read only.
    func testATricklingUpstreamsWholeBurstReachesTheClientBeforeTheNext() async throws {
        let bytes = F.randomBytes(1_000_000)
        try await expectEarly(600_000, of: bytes, within: 2.1, "the third burst (1.6 s) whole, before the fourth (2.4 s)",
                              timeouts: Self.patientTimeouts,
                              from: .init(body: bytes, chunkSize: 200_000, delay: .milliseconds(800)))
    }

    /// A batch is readable as soon as its write completes: an upstream that
    /// sends more than a batch and then pauses has that batch reach its
    /// client during the pause, not when the next bytes come. (The body's
    /// first megabyte goes out chunk by chunk anyway: the batch that counts
    /// here is the second.)
    func testAWrittenBatchReachesTheClientWhileTheUpstreamPauses() async throws {
        let bytes = F.randomBytes(2_500_000)
        try await expectEarly(2 * BlobSink.batchSize, of: bytes, within: 1.0,
                              "the second batch during the 1.5 s pause, not after it", timeouts: Self.patientTimeouts,
                              from: .init(body: bytes, chunkSize: 100_000, stallAfter: 2_200_000,
                                          stallFor: .milliseconds(1500)))
    }

    /// The tail of a burst longer than a batch goes out when the upstream
    /// pauses, not when its next bytes come: the fill's own connection
    /// tells the sink of the pause (`FillDownload`, an empty part).
    func testTheTailOfABurstReachesTheClientDuringThePauseAfterIt() async throws {
        let bytes = F.randomBytes(3_000_000)
        try await expectEarly(1_600_000, of: bytes, within: 1.0,
                              "the burst's last 550 KB during the 1.5 s pause, not after it", timeouts: Self.patientTimeouts,
                              from: .init(body: bytes, chunkSize: 100_000, stallAfter: 1_600_000,
                                          stallFor: .milliseconds(1500)))
    }

    /// A trickle of 10 KB pieces, closer together than a pause
    /// (`BlobSink.flushAfter`, 50 ms): what the fill gathers still reaches
    /// the client about a pause later, not once a read burst's worth
    /// (256 KiB, ~0.8 s here) or a batch has added up. (A download that
    /// held its bytes until 256 KiB, without a timer to hand them on,
    /// failed this: 0.86 s.)
    func testATrickleSmallerThanAHandOnReachesTheClientAsItComes() async throws {
        let bytes = F.randomBytes(600_000)
        try await expectEarly(100_000, of: bytes, within: 0.6, "100 KB (upstream's by 0.3 s) well before 256 KiB (0.8 s)",
                              timeouts: Self.patientTimeouts,
                              from: .init(body: bytes, chunkSize: 10_000, delay: .milliseconds(30)))
    }

    /// Each flushed batch of a trickling fill wakes every follower: none of
    /// eight clients waits for a whole batch, and each gets every byte.
    func testEveryClientOfATricklingFillGetsItsBytesAsTheyCome() async throws {
        let bytes = F.randomBytes(600_000)
        let (upstream, proxy) = try await start { _ in
            .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(500))
        }
        let sockets = try (0..<8).map { _ in try RawSocket(port: proxy.port, receiveTimeout: 5) }
        let started = Date()
        for socket in sockets {
            XCTAssertTrue(socket.send("GET /v2/a/blobs/\(F.digest(of: bytes)) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
        }
        // One after another: a client read later finds what the proxy sent
        // it meanwhile, so each must hold 300 KB by the fourth chunk.
        var early: [[UInt8]] = []
        for socket in sockets {
            XCTAssertTrue(socket.receiveHead().hasPrefix("HTTP/1.1 200"))
            early.append(socket.receive(limit: 300_000))
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 1.8, "300 KB to all by the fourth chunk (1.5 s)")
        for (socket, first) in zip(sockets, early) {
            XCTAssertGreaterThanOrEqual(first.count, 300_000)
            let rest = socket.receive(limit: bytes.count - first.count)
            XCTAssertTrue(first + rest == bytes, "every byte, verified")
            socket.close()
        }
        XCTAssertEqual(upstream.gets.count, 1, "one fill for all clients")
        await stop(upstream, proxy)
    }

    func testAnUpstreamThatStallsLongerThanTheIdleTimeoutIsCut() async throws {
        let bytes = F.randomBytes(1_000_000)
        let (upstream, proxy) = try await start { _ in
            .init(body: bytes, chunkSize: 100_000, stallAfter: 300_000, stallFor: .seconds(6))
        }
        let started = Date()
        let result = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: bytes))")
        XCTAssertNotEqual(result.exit, 0, "a cut, never a complete-looking body")
        XCTAssertLessThan(result.body.count, bytes.count)
        XCTAssertLessThan(Date().timeIntervalSince(started), 4, "upstream_idle is 1 s")
        try await Task.sleep(for: .milliseconds(200))
        XCTAssertEqual(proxy.files(in: "blobs"), [])
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        await stop(upstream, proxy)
    }

    func testAFollowerWhoseClientLeftReleasesItsDescriptorAtOnce() async throws {
        let bytes = F.randomBytes(1_000_000)
        let (upstream, proxy) = try await start { _ in
            .init(body: bytes, chunkSize: 100_000, stallAfter: 200_000, stallFor: .milliseconds(900))
        }
        func openTemporaryFiles() -> Int { Self.descriptors(under: proxy.folder + "/tmp/") }
        let socket = try RawSocket(port: proxy.port)
        socket.send("GET /v2/a/blobs/\(F.digest(of: bytes)) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        XCTAssertTrue(socket.receiveHead().hasPrefix("HTTP/1.1 200"))
        try await Task.sleep(for: .milliseconds(200))  // the upstream is stalled now
        let whileConnected = openTemporaryFiles()
        socket.close()
        try await Task.sleep(for: .milliseconds(300))  // still stalled: the fill has not moved
        XCTAssertEqual(openTemporaryFiles(), whileConnected - 1, "the follower's descriptor went with its client")
        await stop(upstream, proxy)
    }

    // MARK: client uploads slowly

    func testASlowPushOutlastsTheUpstreamAnswerTimeout() async throws {
        // 300 KB at 100 KB/s: 3 s of sending, with upstream (answer) and
        // request_body both 1 s. The registry answers only after the body.
        let (upstream, proxy) = try await start { head in
            head.method == .PUT ? .init(status: .created, headers: ["location": "/v2/a/blobs/sha256:x"]) : .init()
        }
        let uploader = try SlowUploader(port: proxy.port)
        let body = F.randomBytes(300_000)
        XCTAssertTrue(uploader.upload(
            head: "PUT /v2/a/blobs/uploads/1?digest=sha256:x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(body.count)\r\n\r\n",
            body: body, bytesPerSecond: 100_000, chunked: false))
        let answer = String(decoding: uploader.receiveAll(deadline: 5), as: UTF8.self)
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 201"), answer)
        XCTAssertEqual(upstream.requests.first?.bodyBytes, body.count)
        await stop(upstream, proxy)
    }

    func testExpectContinueIsAnsweredAtOnce() async throws {
        // A client that waits for 100 Continue before its body must get it
        // before the request-body timeout (1 s here) could count its wait.
        let (upstream, proxy) = try await start { _ in .init(status: .created) }
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        socket.send("PUT /v2/a/blobs/uploads/1?digest=sha256:x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        let interim = socket.receiveHead()
        XCTAssertTrue(interim.hasPrefix("HTTP/1.1 100"), interim)
        socket.send("hello")
        let final = socket.receiveHead()
        XCTAssertTrue(final.hasPrefix("HTTP/1.1 201"), final)
        XCTAssertEqual(upstream.requests.first?.bodyBytes, 5)
        XCTAssertNil(upstream.requests.first?.headers.first(name: "expect"), "the expectation was met here")
        await stop(upstream, proxy)
    }

    func testASlowChunkedPushArrivesWhole() async throws {
        let (upstream, proxy) = try await start { _ in .init(status: .accepted) }
        let uploader = try SlowUploader(port: proxy.port)
        let body = F.randomBytes(200_000)
        XCTAssertTrue(chunkedPatch(uploader, body: body, bytesPerSecond: 100_000))
        let answer = String(decoding: uploader.receiveAll(deadline: 5), as: UTF8.self)
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 202"), answer)
        XCTAssertEqual(upstream.requests.first?.bodyBytes, body.count)
        await stop(upstream, proxy)
    }

    func testAnInterruptedChunkedUploadIsNeverForwardedAsComplete() async throws {
        // Ten times: the decoder's error on the cut body and the proxy's own
        // answer to the broken request race each other, and at most one of
        // them may answer (a second answer trips NIO's pipelining handler).
        let (upstream, proxy) = try await start { _ in .init(status: .accepted) }
        for _ in 0..<10 {
            let uploader = try SlowUploader(port: proxy.port)
            XCTAssertTrue(chunkedPatch(uploader, body: F.randomBytes(100_000), bytesPerSecond: 2_000_000, stopAfter: 50_000))
            uploader.close()  // the client goes away mid-body
            try await Task.sleep(for: .milliseconds(50))
        }
        try await Task.sleep(for: .milliseconds(800))
        XCTAssertEqual(upstream.requests.count, 0, "the upstream never saw a complete request")
        await stop(upstream, proxy)
    }

    func testAnUploadThatStallsIsCutByTheRequestBodyTimeout() async throws {
        let (upstream, proxy) = try await start { _ in .init(status: .accepted) }
        let uploader = try SlowUploader(port: proxy.port)
        let started = Date()
        XCTAssertTrue(chunkedPatch(uploader, body: F.randomBytes(100_000), bytesPerSecond: 1_000_000, stopAfter: 50_000))
        // The client keeps the connection open and sends nothing more.
        _ = uploader.receiveAll(deadline: 5)
        XCTAssertLessThan(Date().timeIntervalSince(started), 3.5, "request_body is 1 s")
        XCTAssertEqual(try proxy.metric("cacheproxy_client_timeouts_total{kind=\"request_body\"}"), 1)
        try await Task.sleep(for: .milliseconds(300))
        XCTAssertEqual(upstream.requests.count, 0, "the cut upload was not forwarded as complete")
        await stop(upstream, proxy)
    }

    func testAnErrorAnswerWithATricklingBodyIsPassedOnInTime() async throws {
        // A 404 whose 100 KB body trickles for 20 s: clients of the digest
        // must not wait for all of it (at most 64 KiB, within `upstream`).
        let body = Array(repeating: UInt8(ascii: "x"), count: 100_000)
        let (upstream, proxy) = try await start { _ in
            .init(status: .notFound, body: body, chunkSize: 1000, delay: .milliseconds(200))
        }
        let started = Date()
        let result = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: [1]))", ["--max-time", "10"])
        XCTAssertEqual(result.code, 404)
        XCTAssertLessThan(Date().timeIntervalSince(started), 3.5)
        await stop(upstream, proxy)
    }

    func testAnUpstreamThatStopsTakingAnUploadIsGivenUp() async throws {
        // The upstream accepts the connection and never reads: the upload
        // stalls on the upstream's side, where no client timeout can see it.
        let silent = try SilentListener()
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(silent.port), schema: \"http\"}",
            extraYAML: Self.shortTimeouts)
        let file = try makeTemporaryFolder("upload") + "/body"
        try Data(F.randomBytes(32 << 20)).write(to: URL(fileURLWithPath: file))
        let started = Date()
        let result = try curl("\(proxy.base)/v2/a/blobs/uploads/1", ["-X", "PUT", "--data-binary", "@\(file)", "--max-time", "20"])
        XCTAssertEqual(result.code, 504)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5, "upstream_idle is 1 s")
        await proxy.stop()
        silent.stop()
    }

    func testAnUpstreamSilentAfterTheBodyGets504() async throws {
        let (upstream, proxy) = try await start { _ in .init(silent: true) }
        let started = Date()
        let result = try curl("\(proxy.base)/v2/a/manifests/latest")
        XCTAssertEqual(result.code, 504)
        XCTAssertLessThan(Date().timeIntervalSince(started), 3.5)
        XCTAssertTrue(String(decoding: result.body, as: UTF8.self).contains("TIMEOUT"))
        await stop(upstream, proxy)
    }

    // MARK: a real client behind a slow path

    func testSkopeoBehindARateLimitedPathPullsThroughShortTimeouts() async throws {
        // The real registry as upstream; skopeo reaches the proxy through a
        // relay that passes 1 MB/s, so its 1.5 MB layer takes well over every
        // 1 s timeout.
        let registry = try Registry()
        let image = try TestImage.make()
        try image.push(to: "\(registry.address)/slow/app:v1")
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}",
            extraYAML: Self.shortTimeouts)
        let relay = try ThrottledRelay(targetPort: proxy.port, downstreamBytesPerSecond: 1_000_000)
        let out = try makeTemporaryFolder("slow-pull")
        let started = Date()
        let (status, output) = try shell("skopeo", ["copy", "--src-tls-verify=false",
                                                     "docker://127.0.0.1:\(relay.port)/slow/app:v1", "dir:\(out)"])
        XCTAssertEqual(status, 0, output)
        XCTAssertGreaterThan(Date().timeIntervalSince(started), 1.5, "the path really was slow")
        for layer in image.layers + [image.config] {
            let hex = String(layer.dropFirst("sha256:".count))
            let data = try Data(contentsOf: URL(fileURLWithPath: "\(out)/\(hex)"))
            XCTAssertEqual(F.digest(of: Array(data)), layer)
        }
        relay.stop()
        await proxy.stop()
        registry.stop()
    }
}

/// A TCP listener that accepts connections and never reads from them.
final class SilentListener: @unchecked Sendable {
    let port: Int
    private let fd: Int32
    private let accepted = NIOLockedValueBox<[Int32]>([])
    private let thread: Thread

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var small: Int32 = 16 * 1024
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { ptr -> Bool in
                bind(fd, ptr, len) == 0 && listen(fd, 16) == 0 && getsockname(fd, ptr, &len) == 0
            }
        }
        guard ok else { throw TestError("cannot listen") }
        port = Int(UInt16(bigEndian: addr.sin_port))
        let (listener, accepted) = (fd, accepted)
        thread = Thread {
            while true {
                let client = accept(listener, nil, nil)
                if client < 0 { return }
                accepted.withLockedValue { $0.append(client) }
            }
        }
        thread.start()
    }

    func stop() {
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
        for client in accepted.withLockedValue({ $0 }) { close(client) }
    }
}
