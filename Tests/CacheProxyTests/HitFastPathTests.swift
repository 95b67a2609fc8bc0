import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import XCTest
@testable import CacheProxy
#if canImport(Glibc)
import Glibc
#endif

/// The hit fast path (`HitFrontHandler`, `PlainGetHead`): answers what it
/// may, in order, and leaves everything else to the decoder.
final class HitFastPathTests: XCTestCase {
    typealias F = FaultInjectionTests

    private func parse(_ text: String, limit: Int = 8192) -> PlainGetHead? {
        Array(text.utf8).withUnsafeBytes { PlainGetHead.parse($0, limit: limit)?.head }
    }

    func testTheParserTakesOnlyPlainKeepAliveGets() {
        let plain = "GET /v2/a/blobs/sha256:ab?ns=x HTTP/1.1\r\nHost: h:5000\r\nAuthorization: Basic  eA== \r\n"
            + "Accept: */*\r\nConnection: Keep-Alive\r\n\r\nGET /next"
        let head = parse(plain)
        XCTAssertEqual(head?.target, "/v2/a/blobs/sha256:ab?ns=x")
        XCTAssertEqual(head?.host, "h:5000")
        XCTAssertEqual(head?.authorization, "Basic  eA== ")
        // `Accept` and `User-Agent` as offsets into the head (a tag's
        // upstream `HEAD` carries them), each as the decoder keeps it.
        func text(_ range: Range<Int>?, _ of: String) -> String? {
            range.map { String(decoding: Array(of.utf8)[$0], as: UTF8.self) }
        }
        XCTAssertEqual(text(head?.accept, plain), "*/*")
        XCTAssertEqual(head?.acceptCount, 1)
        XCTAssertNil(head?.userAgent)
        let agent = "GET /v2/a/manifests/1 HTTP/1.1\r\nUser-Agent: containerd/2.0 \r\nHost: h\r\n"
            + "Accept: a/b\r\nAccept: c/d, e/f\r\n\r\n"
        XCTAssertEqual(text(parse(agent)?.userAgent, agent), "containerd/2.0 ")
        XCTAssertEqual(parse(agent)?.acceptCount, 2, "Docker's one field per type: counted, for the decoder's way")
        let length = Array(plain.utf8).withUnsafeBytes { PlainGetHead.parse($0, limit: 8192)?.length }
        XCTAssertEqual(length, plain.utf8.count - "GET /next".utf8.count, "ends at the blank line")
        let h = "GET /v2/a/blobs/x HTTP/1.1\r\nHost: h\r\n"
        let declined = [
            "HEAD /v2/a/blobs/x HTTP/1.1\r\nHost: h\r\n\r\n", "get /v2/a/blobs/x HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET http://h/v2/a/blobs/x HTTP/1.1\r\nHost: h\r\n\r\n", "GET /v2/a#x HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /v2/a/blobs/x HTTP/1.0\r\nHost: h\r\n\r\n", "GET /v2/a/blobs/x  HTTP/1.1\r\nHost: h\r\n\r\n",
            h + "Content-Length: 0\r\n\r\n", h + "Transfer-Encoding: chunked\r\n\r\n", h + "Expect: 100-continue\r\n\r\n",
            h + "Range: bytes=0-1\r\n\r\n", h + "Upgrade: h2c\r\n\r\n", h + "Connection: close\r\n\r\n",
            h + "Host: other\r\n\r\n", h + "Authorization: a\r\nAuthorization: b\r\n\r\n",
            h + "User-Agent: a\r\nuser-agent: b\r\n\r\n",
            h + "X: folded\r\n continued\r\n\r\n", h + "X : y\r\n\r\n", h + "X: y\n\r\n", h + "X: y\r\n\n",
            h + "X: caf\u{e9}\r\n\r\n", h + "X: \u{1}\r\n\r\n", h + "\r\n".dropLast(),  // cut before its end
            h,  // no blank line yet
            "GET /v2/a/blobs/x?ns=h HTTP/1.1\r\nAccept: */*\r\n\r\n",  // no Host: the checks answer 400
            h + "Proxy-Connection: close\r\n\r\n",  // llhttp's Connection
        ]
        for text in declined { XCTAssertNil(parse(text), text.debugDescription) }
        XCTAssertNil(parse(h + "X: \(String(repeating: "y", count: 100))\r\n\r\n", limit: 64), "past the limit")
    }

    /// Reads one response: its head, and a body of its Content-Length.
    private func readResponse(_ socket: RawSocket) -> (head: String, body: [UInt8])? {
        let head = socket.receiveHead()
        guard head.hasPrefix("HTTP/1.1 ") else { return nil }
        let length = head.split(separator: "\r\n").first { $0.lowercased().hasPrefix("content-length:") }
            .flatMap { Int($0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) } ?? 0
        var body = [UInt8](repeating: 0, count: length)
        var got = 0
        while got < length {
            let n = body[got...].withUnsafeMutableBytes { recv(socket.fd, $0.baseAddress, $0.count, 0) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return nil }
            got += n
        }
        return (head, body)
    }

    private func get(_ path: String) -> String { "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" }

    /// A small blob in memory, and a second blob whose upstream answers late:
    /// pipelined behind the slow miss, hits wait their turn; a body that
    /// looks like a request stays a body; hundreds of hits sent before the
    /// client reads any arrive whole and in order.
    func testPipelinedHitsKeepTheirPlaceAndBodiesStayBodies() async throws {
        let small = F.randomBytes(4096), slow = F.randomBytes(10_000)
        let smallDigest = F.digest(of: small), slowDigest = F.digest(of: slow)
        let upstream = try await FakeUpstream { head in
            head.uri.contains(slowDigest) ? .init(body: slow, headDelay: .milliseconds(1500)) : .init(body: small)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let smallPath = "/v2/a/blobs/\(smallDigest)"
        for _ in 0..<2 { XCTAssertEqual(try curl(proxy.base + smallPath).body, Data(small)) }  // fill, then into memory
        let hitsBefore = try proxy.metric("cacheproxy_blob_hits_total")

        let socket = try RawSocket(port: proxy.port)
        // The hits come in reads of their own while the miss is still owed.
        XCTAssertTrue(socket.send(get("/v2/a/blobs/\(slowDigest)")))
        try await Task.sleep(for: .milliseconds(100))
        XCTAssertTrue(socket.send(get(smallPath)))
        try await Task.sleep(for: .milliseconds(100))
        XCTAssertTrue(socket.send(get(smallPath)))
        let first = readResponse(socket), second = readResponse(socket), third = readResponse(socket)
        XCTAssertTrue(first?.body == slow, "the slow miss first")
        XCTAssertTrue(second?.body == small)
        XCTAssertTrue(third?.body == small)

        // A GET with a body that spells a request, the body in a read of
        // its own after the answer: a body (the decoder's), never answered
        // as a request of its own.
        let inner = get(smallPath)
        XCTAssertTrue(socket.send("GET \(smallPath) HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \(inner.utf8.count)\r\n\r\n"))
        XCTAssertTrue(readResponse(socket)?.body == small)
        XCTAssertTrue(socket.send(inner))
        try await Task.sleep(for: .milliseconds(100))
        XCTAssertTrue(socket.send(get(smallPath)))
        XCTAssertTrue(readResponse(socket)?.body == small)
        var pollSet = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
        XCTAssertEqual(poll(&pollSet, 1, 500), 0, "no other answer: the body was not a request")

        // 400 hits in one write, read only once all are sent: past the
        // channel's high watermark the rest wait their turn on the decoder's
        // side, and each arrives whole, in order.
        XCTAssertTrue(socket.send(String(repeating: get(smallPath), count: 400)))
        for index in 0..<400 {
            guard let response = readResponse(socket) else { return XCTFail("answer \(index) missing") }
            XCTAssertTrue(response.head.hasPrefix("HTTP/1.1 200"), response.head)
            XCTAssertTrue(response.body == small, "answer \(index)")
        }
        socket.close()
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_hits_total") - hitsBefore, 404)
        XCTAssertEqual(upstream.gets.count, 2, "one fill each")
        await proxy.stop()
        await upstream.stop()
    }

    /// Fast answers keep a busy connection open past the idle timeout, and
    /// an idle one is still closed after it; a client that is not allowed
    /// (wrong upstream host) is never answered from memory.
    func testTimeoutsAndRoutingHoldOnTheFastPath() async throws {
        let small = F.randomBytes(2048)
        let digest = F.digest(of: small)
        let upstream = try await FakeUpstream { _ in .init(body: small) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        extraYAML: "timeouts: {idle: 1}")
        let path = "/v2/a/blobs/\(digest)"
        for _ in 0..<2 { XCTAssertEqual(try curl(proxy.base + path).body, Data(small)) }
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 3)
        for _ in 0..<7 {  // 1.75 s of hits, each 250 ms apart
            XCTAssertTrue(socket.send(get(path)))
            XCTAssertTrue(readResponse(socket)?.body == small)
            try await Task.sleep(for: .milliseconds(250))
        }
        let started = Date()
        XCTAssertEqual(socket.receive(), [], "closed once idle")
        XCTAssertLessThan(Date().timeIntervalSince(started), 2.5, "by the idle timeout, not the test's")

        let stranger = try RawSocket(port: proxy.port)
        XCTAssertTrue(stranger.send("GET \(path) HTTP/1.1\r\nHost: unknown.example\r\n\r\n"))
        let refused = readResponse(stranger)
        XCTAssertFalse(refused?.head.hasPrefix("HTTP/1.1 200") ?? true, refused?.head ?? "no answer")
        await proxy.stop()
        await upstream.stop()
    }

    /// A head the decoder holds unfinished (cut after a request it passed
    /// on, in the same read) takes the next read as its own: the fast path
    /// must not answer those bytes as a request of their own.
    func testBytesThatFinishAHeadTheDecoderHoldsAreNeverAnsweredAsARequest() async throws {
        let small = F.randomBytes(4096)
        let digest = F.digest(of: small)
        let upstream = try await FakeUpstream { head in
            head.uri.contains("/manifests/") ? .init(status: .notFound, body: Array("{}".utf8)) : .init(body: small)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let path = "/v2/a/blobs/\(digest)"
        for _ in 0..<2 { XCTAssertEqual(try curl(proxy.base + path).body, Data(small)) }
        let socket = try RawSocket(port: proxy.port)
        XCTAssertTrue(socket.send("HEAD \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /v2/a/manifests/x HTTP/1.1\r\nX-Pad: "))
        XCTAssertTrue(socket.receiveHead().hasPrefix("HTTP/1.1 200"), "the HEAD")
        try await Task.sleep(for: .milliseconds(100))
        // The rest of the manifest request's head, spelling a blob GET.
        XCTAssertTrue(socket.send(get(path)))
        let answer = readResponse(socket)
        XCTAssertTrue(answer?.head.hasPrefix("HTTP/1.1 404") ?? false, answer?.head ?? "no answer")
        XCTAssertEqual(upstream.requests.filter { $0.uri.contains("/manifests/x") }.count, 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// Busy marks are counted: the async side marking its answer done late
    /// does not make a connection whose next (fast) answer is under way
    /// look idle to a drain.
    func testABusyMarkOutlivesALateIdleMark() throws {
        let tracker = ConnectionTracker()
        let channel = EmbeddedChannel()
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        XCTAssertTrue(tracker.add(channel))
        tracker.setIdle(channel, false)  // the async side's answer
        tracker.setIdle(channel, false)  // the fast path's next one
        tracker.setIdle(channel, true)   // the async side, late
        tracker.drain()
        XCTAssertTrue(channel.isActive, "still answering: not closed by the drain")
        tracker.setIdle(channel, true)
        tracker.drain()
        XCTAssertFalse(channel.isActive, "idle: closed")
    }

    /// A manifest by digest is content like a blob: after its first reads
    /// it is answered from memory on the event loop, with its own media
    /// type, and counted as a manifest hit.
    func testAManifestByDigestIsAnsweredFromMemoryWithItsMediaType() async throws {
        let manifest = Array(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#.utf8)
        let digest = F.digest(of: manifest)
        let type = "application/vnd.oci.image.manifest.v1+json"
        let upstream = try await FakeUpstream { _ in .init(headers: ["content-type": type], body: manifest) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let path = "/v2/a/manifests/\(digest)"
        for _ in 0..<2 { XCTAssertEqual(try curl(proxy.base + path).body, Data(manifest)) }  // fill, then into memory
        let hitsBefore = try proxy.metric("cacheproxy_manifest_hits_total")
        let socket = try RawSocket(port: proxy.port)
        for _ in 0..<3 {
            XCTAssertTrue(socket.send(get(path)))
            guard let answer = readResponse(socket) else { return XCTFail("no answer") }
            XCTAssertTrue(answer.body == manifest)
            XCTAssertTrue(answer.head.lowercased().contains("content-type: \(type)"), answer.head)
            XCTAssertTrue(answer.head.lowercased().contains("docker-content-digest: \(digest)"), answer.head)
        }
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_hits_total") - hitsBefore, 3)
        XCTAssertEqual(upstream.gets.count, 1, "one fill")
        await proxy.stop()
        await upstream.stop()
    }

    /// The fast path's answers are watched by the send timeout like any
    /// other: a client that pipelines hits and stops reading is cut after
    /// it; one that reads them slowly but steadily, longer than it, is not.
    func testTheSendTimeoutWatchesFastAnswers() async throws {
        let blob = F.randomBytes(60_000)  // in memory (up to 64 KiB)
        let digest = F.digest(of: blob)
        let upstream = try await FakeUpstream { _ in .init(body: blob) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        extraYAML: "timeouts: {idle: 5, send: 1}")
        let path = "/v2/a/blobs/\(digest)"
        for _ in 0..<2 { XCTAssertEqual(try curl(proxy.base + path).body, Data(blob)) }

        let stalled = try SlowReader(port: proxy.port)
        XCTAssertTrue(stalled.send(String(repeating: get(path), count: 100)))
        try await Task.sleep(for: .seconds(3))  // never reads: past the send timeout
        XCTAssertTrue(stalled.waitForPeerClose(timeout: 5), "cut by the send timeout")

        let steady = try SlowReader(port: proxy.port)
        XCTAssertTrue(steady.send(String(repeating: get(path), count: 20)))
        // 1.2 MB at 400 kB/s: three seconds, three times the send timeout.
        let result = steady.read(bytesPerSecond: 400_000, limit: 20 * (blob.count + 200), deadline: 10)
        XCTAssertFalse(result.closedByPeer, "a steady reader is never cut")
        XCTAssertGreaterThan(result.seconds, 2)
        XCTAssertGreaterThanOrEqual(result.bytes.count, 20 * blob.count)
        await proxy.stop()
        await upstream.stop()
    }

    /// Differential: whatever `PlainGetHead` accepts, NIO's decoder reads as
    /// the same one bodiless request (method, target, Host, Authorization,
    /// and where it ends) and `RequestValidator` accepts. Heads are built
    /// from a grammar and then mutated with the bytes parsers disagree on.
    func testWhatTheFastParserAcceptsNIOsDecoderReadsTheSameWay() throws {
        let seed = UInt64.random(in: 1...UInt64.max)
        var random = SeededGenerator(seed: seed)
        let router = Router(upstreams: [.init(host: "h", registry: "r", port: 443, schema: "https", aliases: [])])
        let tricky: [UInt8] = Array(" \t\r\n:,#?/\\\"".utf8) + [0, 0x0b, 0x0c, 0x7f, 0x80, 0xff, UInt8(ascii: "a"), UInt8(ascii: "H")]
        let names = ["Host", "Authorization", "Accept", "Connection", "X-A", "Content-Length",
                     "Transfer-Encoding", "Range", "Proxy-Connection", "Upgrade", "Expect"]
        var accepted = 0
        for _ in 0..<20_000 {
            var text = "GET /v2/a/blobs/sha256:\(Int.random(in: 0...9, using: &random))?ns=x HTTP/1.1\r\n"
            text += "\(["Host", "host", "HOST"].randomElement(using: &random)!): h\r\n"
            for _ in 0..<Int.random(in: 0...3, using: &random) {
                text += "\(names.randomElement(using: &random)!): \(["h", "keep-alive", "close", "Basic eA==", "0", "a b"].randomElement(using: &random)!)\r\n"
            }
            text += "\r\nGET / HTTP/1.1\r\n"
            var bytes = Array(text.utf8)
            for _ in 0..<Int.random(in: 0...3, using: &random) {
                let at = Int.random(in: 0..<bytes.count, using: &random)
                switch Int.random(in: 0...2, using: &random) {
                case 0: bytes.insert(tricky.randomElement(using: &random)!, at: at)
                case 1: bytes[at] = tricky.randomElement(using: &random)!
                default: bytes.remove(at: at)
                }
            }
            guard let (fast, length) = bytes.withUnsafeBytes({ PlainGetHead.parse($0, limit: 8192) }) else { continue }
            accepted += 1
            let channel = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder()))
            let described = "seed \(seed): " + String(decoding: bytes[..<length], as: UTF8.self).debugDescription
            XCTAssertNoThrow(try channel.writeInbound(ByteBuffer(bytes: bytes[..<length])), described)
            guard case .head(let head)? = try channel.readInbound(as: HTTPServerRequestPart.self) else {
                XCTFail("NIO read no head from \(described)")
                continue
            }
            guard case .end? = try channel.readInbound(as: HTTPServerRequestPart.self) else {
                XCTFail("NIO read a body or nothing after \(described)")
                continue
            }
            XCTAssertEqual(head.method, .GET, described)
            XCTAssertEqual(head.version, .http1_1, described)
            XCTAssertEqual(head.uri, fast.target, described)
            XCTAssertEqual(head.headers["host"], fast.host.map { [$0] } ?? [], described)
            XCTAssertEqual(head.headers["authorization"], fast.authorization.map { [$0] } ?? [], described)
            XCTAssertTrue(head.isKeepAlive, described)
            if case .accept = RequestValidator.check(head, router: router) {} else { XCTFail("refused: \(described)") }
            XCTAssertNoThrow(try channel.finish(), "NIO holds bytes past the end of \(described)")
        }
        XCTAssertGreaterThan(accepted, 1000, "the mutations leave enough heads whole to compare")
    }
}

/// A small seeded generator (SplitMix64), so a failing case can be replayed.
struct SeededGenerator: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
