import Foundation
import NIOCore
import NIOPosix
import Logging
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// The fill's own upstream connection (`FillDownload`): its state machine
/// alone, then against fake upstreams whose faults a registry cannot make.
final class FillDownloadTests: XCTestCase {
    private typealias Machine = FillDownloadStateMachine
    typealias F = FaultInjectionTests

    private func head(_ code: UInt) -> HTTPResponseHead {
        HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: Int(code)))
    }

    private func sizes(_ action: Machine.Action) -> [Int]? {
        guard case .yield(let parts, _) = action else { return nil }
        return parts.map(\.readableBytes)
    }

    func testABodyGoesOnOneReadBurstAtATimeAndReadsStopWhileTheConsumerIsFull() {
        var m = Machine()
        guard case .read = m.readComplete() else { return XCTFail("reads on while the head is awaited") }
        guard case .answer(let answered) = m.receivedHead(head(200)) else { return XCTFail("the head is handed on") }
        XCTAssertEqual(answered.status, .ok)
        guard case .none = m.receivedBody(ByteBuffer(repeating: 1, count: 10)) else { return XCTFail() }
        guard case .none = m.receivedBody(ByteBuffer(repeating: 2, count: 20)) else { return XCTFail() }
        XCTAssertEqual(sizes(m.readComplete()), [10, 20], "one burst's parts go on together, at its end")
        guard case .none = m.yielded(more: false) else { return XCTFail("a full consumer stops the reads") }
        guard case .none = m.readComplete() else { return XCTFail("an empty burst asks nothing while full") }
        guard case .read = m.demanded() else { return XCTFail("the consumer's demand asks for the next read") }
        guard case .none = m.demanded() else { return XCTFail("a second demand reads nothing more") }
        guard case .none = m.receivedBody(ByteBuffer(repeating: 3, count: 5)) else { return XCTFail() }
        guard case .yield(let last, end: true) = m.receivedEnd() else { return XCTFail("the end hands on the rest") }
        XCTAssertEqual(last.map(\.readableBytes), [5])
        guard case .close = m.failed(transport: true) else { return XCTFail("a close after the end is no failure") }
    }

    func testAPauseIsToldOnlyWhileReadsGoOn() {
        var m = Machine()
        guard case .none = m.quiet() else { return XCTFail("no pause before the head") }
        guard case .answer = m.receivedHead(head(404)) else { return XCTFail("the answer, whatever its status") }
        XCTAssertEqual(sizes(m.quiet()), [0], "a pause is told as an empty part")
        _ = m.receivedBody(ByteBuffer(repeating: 1, count: 10))
        _ = m.readComplete()
        _ = m.yielded(more: false)
        guard case .none = m.quiet() else { return XCTFail("a wait for a full consumer is not the upstream's pause") }
        _ = m.demanded()
        XCTAssertEqual(sizes(m.quiet()), [0])
    }

    func testACutBeforeTheHeadFailsTheWaitAndACutAfterItFailsTheBody() {
        var before = Machine()
        guard case .fail(.cut, let none, headAnswered: false) = before.failed(transport: true) else { return XCTFail() }
        XCTAssertTrue(none.isEmpty)
        guard case .close = before.failed(transport: false) else { return XCTFail("one failure only") }

        var after = Machine()
        _ = after.receivedHead(head(200))
        _ = after.receivedBody(ByteBuffer(repeating: 1, count: 7))
        guard case .fail(.cut, let parts, headAnswered: true) = after.failed(transport: true) else { return XCTFail() }
        XCTAssertEqual(parts.map(\.readableBytes), [7], "bytes read before the cut still go on, then the failure")
        var garbled = Machine()
        _ = garbled.receivedHead(head(200))
        guard case .fail(.malformed, _, headAnswered: true) = garbled.failed(transport: false) else { return XCTFail() }
    }

    func testAConsumerThatLeavesClosesTheConnectionAndNothingFollows() {
        var m = Machine()
        _ = m.receivedHead(head(200))
        guard case .close = m.consumerLeft() else { return XCTFail() }
        guard case .none = m.readComplete() else { return XCTFail("nothing read once it left") }
        guard case .none = m.demanded() else { return XCTFail() }
        guard case .none = m.quiet() else { return XCTFail() }
        guard case .close = m.receivedBody(ByteBuffer(repeating: 1, count: 1)) else { return XCTFail() }
    }

    // MARK: against a fake upstream

    /// An upstream that sends more than its `Content-Length`: the bytes past
    /// it are never served nor stored, and the blob the length covers is.
    /// The request the fill sent names the registry as `Host` and carries
    /// none of the client's hop-by-hop fields; each blob fill has a
    /// connection of its own.
    func testBytesPastTheContentLengthAreNeverServedAndTheRequestIsTheProxysOwn() async throws {
        let blob = F.randomBytes(300_000)
        let digest = F.digest(of: blob)
        let upstream = try await FakeUpstream { _ in
            .init(headers: ["content-length": String(blob.count)], body: blob + Array("HTTP/1.1 200 OK\r\n\r\nsmuggled".utf8))
        }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        let first = try curl("\(proxy.base)/v2/a/blobs/\(digest)", ["-H", "Connection: keep-alive, x-secret",
                                                                     "-H", "X-Secret: 1"])
        XCTAssertEqual(first.code, 200)
        XCTAssertEqual(Array(first.body), blob, "the declared bytes, and not one more")
        let again = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(Array(again.body), blob, "kept as verified")
        XCTAssertEqual(upstream.gets.count, 1)
        let sent = try XCTUnwrap(upstream.gets.first)
        XCTAssertEqual(sent.headers["host"], ["127.0.0.1:\(upstream.port)"])
        XCTAssertFalse(sent.headers.contains(name: "connection"),
                       "no close asked: an upstream's close after the body would be read past back-pressure")
        XCTAssertFalse(sent.headers.contains(name: "x-secret"), "the client's hop-by-hop fields stay with it")
        let other = F.randomBytes(1000)
        _ = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: other))")
        XCTAssertEqual(upstream.connections, 2, "a connection per blob fill, not AsyncHTTPClient's kept-alive one")
        await proxy.stop()
        await upstream.stop()
    }

    /// A redirect's body is never read: its connection is closed as soon as
    /// the fill moves on, even when that body stalls (a dropped body ends
    /// its download; it is not kept alive with it).
    func testTheConnectionOfARedirectsUnreadBodyIsClosed() async throws {
        let bytes = F.randomBytes(10_000)
        let digest = F.digest(of: bytes)
        let other = try await FakeUpstream { _ in .init(body: bytes) }
        let registry = try await FakeUpstream { _ in
            .init(status: .temporaryRedirect, headers: ["location": "http://127.0.0.1:\(other.port)/blob"],
                  body: Array(repeating: 0x20, count: 100_000), chunkSize: 1000, stallAfter: 1000,
                  stallFor: .seconds(20))
        }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}")
        let result = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
        XCTAssertEqual(result.code, 200)
        XCTAssertEqual(Array(result.body), bytes)
        var open = Self.establishedConnections(to: registry.port)
        for _ in 0..<30 where open > 0 {
            try await Task.sleep(for: .milliseconds(100))
            open = Self.establishedConnections(to: registry.port)
        }
        XCTAssertEqual(open, 0, "the redirect's stalled body holds no connection")
        await proxy.stop()
        await registry.stop()
        await other.stop()
    }

    /// Once an upstream redirected a blob, its fills go through the kept-alive
    /// connections of AsyncHTTPClient: the redirect is a short answer, and a
    /// connection (a TLS handshake) per blob would cost more than it saves.
    /// (Asked of the client itself: how many connections AsyncHTTPClient's
    /// pool opens for the later ones depends on when it takes a redirect's
    /// connection back.)
    func testAnUpstreamThatRedirectsIsAskedOverKeptAliveConnectionsAfterwards() async throws {
        let blob = F.randomBytes(5_000)
        let digest = try Digest(parsing: F.digest(of: blob))
        let other = try await FakeUpstream { _ in .init(body: blob) }
        let registry = try await FakeUpstream { _ in
            .init(status: .temporaryRedirect, headers: ["location": "http://127.0.0.1:\(other.port)/blob"])
        }
        let upstream = ProxyConfig.Upstream(host: "h", registry: "127.0.0.1", port: registry.port, schema: "http",
                                            aliases: [])
        let client = try UpstreamClient(eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
                                        timeouts: ProxyConfig.Timeouts(), upstreams: [upstream],
                                        logger: Logger(label: "test"))
        let url = "\(upstream.origin)/v2/a/blobs/\(digest)"
        XCTAssertEqual(client.ownConnection(for: url, upstream: upstream)?.path, "/v2/a/blobs/\(digest)")
        let answer = try await client.getBlob(url: url, headers: [:], upstream: upstream, digest: digest,
                                              ownConnection: true)
        XCTAssertEqual(answer.response.status, .ok)
        var received = [UInt8]()
        for try await chunk in answer.response.body { received += chunk.readableBytesView }
        XCTAssertEqual(received, blob)
        XCTAssertEqual(registry.connections, 1, "the first request on a connection of its own")
        XCTAssertNil(client.ownConnection(for: url, upstream: upstream), "redirected: AsyncHTTPClient's from now on")
        try await client.shutdown()
        await registry.stop()
        await other.stop()
    }

    /// The answer timeout on the fill's own connection (1 s here, counted
    /// from the start): a head that comes within it is waited for, one that
    /// comes after it is a 504 in about that time, and nothing is kept.
    func testAHeadSlowerThanTheAnswerTimeoutIs504AndOneWithinItIsWaitedFor() async throws {
        let (slow, late) = (F.randomBytes(50_000), F.randomBytes(50_000))
        let upstream = try await FakeUpstream { head in
            head.uri.hasSuffix(F.digest(of: slow)) ? .init(body: slow, headDelay: .milliseconds(500))
                                                   : .init(body: late, headDelay: .milliseconds(2500))
        }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {upstream: 1}")
        let within = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: slow))")
        XCTAssertEqual(within.code, 200)
        XCTAssertEqual(Array(within.body), slow)
        let started = Date()
        let after = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: late))")
        XCTAssertEqual(after.code, 504)
        XCTAssertLessThan(Date().timeIntervalSince(started), 2.2, "the answer timeout, not the head's 2.5 s")
        XCTAssertEqual(proxy.files(in: "tmp"), [])
        await proxy.stop()
        await upstream.stop()
    }

    /// A registry written as an IPv6 literal: connected to without its
    /// brackets, named with them in `Host`, each blob on its own connection.
    func testABlobFromAnIPv6RegistryIsFilledOnItsOwnConnection() async throws {
        let blobs = [F.randomBytes(200_000), F.randomBytes(1_000)]
        let upstream: FakeUpstream
        do {
            upstream = try await FakeUpstream(host: "::1") { head in
                .init(body: blobs.first { head.uri.hasSuffix(F.digest(of: $0)) } ?? [])
            }
        } catch {
            throw XCTSkip("no IPv6 loopback here: \(error)")
        }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"[::1]\", port: \(upstream.port), schema: \"http\"}")
        for blob in blobs {
            let result = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: blob))")
            XCTAssertEqual(result.code, 200)
            XCTAssertEqual(Array(result.body), blob)
        }
        XCTAssertEqual(upstream.gets.first?.headers["host"], ["[::1]:\(upstream.port)"])
        XCTAssertEqual(upstream.connections, 2)
        await proxy.stop()
        await upstream.stop()
    }

    /// A registry named by a host name with several addresses: NIO tries
    /// them (Happy Eyeballs), and an attempt that fails (`::1`, where the
    /// upstream does not listen) must not fail the fill the next one
    /// carries. Where `localhost` is `::1` and `127.0.0.1` (Debian's
    /// default `/etc/hosts`); where it is `127.0.0.1` alone, a plain pull.
    func testAFailedConnectAttemptDoesNotFailTheFillOfTheNext() async throws {
        let blob = F.randomBytes(100_000)
        let upstream = try await FakeUpstream(host: "127.0.0.1") { _ in .init(body: blob) }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"localhost\", port: \(upstream.port), schema: \"http\"}")
        for _ in 0..<3 {
            let result = try curl("\(proxy.base)/v2/a/blobs/\(F.digest(of: blob))")
            XCTAssertEqual(result.code, 200)
            XCTAssertEqual(Array(result.body), blob)
            // The client may have its last byte before the fill has put the
            // file in place (the thread pool backend's rename comes after):
            // wait for it, so the next pull is a miss again.
            XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 }, "the fill was published")
            try FileManager.default.removeItem(atPath: proxy.folder + "/blobs")
        }
        await proxy.stop()
        await upstream.stop()
    }

    /// An upstream that answers a `GET` with `101 Switching Protocols`
    /// (NIO's decoder passes a 101 on as the answer, unlike other interim
    /// answers) has not answered it: the client gets a 502, not a 101
    /// whose framing would leave its connection in limbo. A blob (the
    /// fill's own connection), a manifest by digest (AsyncHTTPClient), by
    /// tag (the loop's `HEAD`) and a pass-through.
    func testAnUpstreamSwitchingProtocolsIsA502() async throws {
        let upstream = try await ScriptedUpstream { _ in
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", false)
        }
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {upstream: 2}")
        let digest = F.digest(of: F.randomBytes(1000))
        for path in ["blobs/\(digest)", "manifests/\(digest)", "manifests/v1", "tags/list"] {
            let answer = try curl("\(proxy.base)/v2/a/\(path)", ["--max-time", "10"])
            XCTAssertEqual(answer.code, 502, path)
            XCTAssertTrue(String(decoding: answer.body, as: UTF8.self).contains(#""code":"UNAVAILABLE""#), path)
        }
        XCTAssertTrue(proxy.files(in: "blobs").isEmpty)
        await proxy.stop()
        await upstream.stop()
    }

    /// TCP connections to 127.0.0.1:`port` still established in this
    /// network namespace (`/proc/net/tcp`: the remote address, state 01).
    static func establishedConnections(to port: Int) -> Int {
        guard let table = try? String(contentsOfFile: "/proc/net/tcp", encoding: .utf8) else { return -1 }
        let remote = String(format: "0100007F:%04X", port)
        return table.split(separator: "\n").dropFirst().filter { line in
            let fields = line.split(separator: " ")
            return fields.count > 3 && fields[2] == remote && fields[3] == "01"
        }.count
    }
}
