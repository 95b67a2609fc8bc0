import Foundation
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// Requests crafted by an attacker, sent byte for byte on a raw socket:
/// targets that try to choose the host the proxy connects to, framing that
/// two parsers could read two ways, pipelining. Plus redirects that try to
/// carry a client's credentials elsewhere.
final class HostileClientTests: XCTestCase {
    typealias F = FaultInjectionTests
    var upstream: FakeUpstream!
    /// A service on the proxy's network that no client may reach through it.
    var inside: FakeUpstream!
    var proxy: TestProxy!

    override func setUp() async throws {
        upstream = try await FakeUpstream { _ in .init(body: Array("upstream\n".utf8)) }
        inside = try await FakeUpstream { _ in .init(body: Array("secret\n".utf8)) }
        proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {header_read: 2, idle: 2}")
    }

    override func tearDown() async throws {
        await proxy.stop()
        await upstream.stop()
        await inside.stop()
    }

    /// Sends `request` on a new connection; returns everything until close.
    private func exchange(_ request: String) throws -> String {
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        socket.send(request)
        return String(decoding: socket.receive(), as: UTF8.self)
    }

    func testConnectIsRefusedAndReachesNothing() throws {
        for target in ["@127.0.0.1:\(inside.port)", "127.0.0.1:\(inside.port)"] {
            let answer = try exchange("CONNECT \(target) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            XCTAssertTrue(answer.hasPrefix("HTTP/1.1 405"), answer)
            XCTAssertTrue(answer.lowercased().contains("allow:"), answer)
        }
        XCTAssertEqual(inside.requests.count, 0)
        XCTAssertEqual(upstream.requests.count, 0)
    }

    func testTargetsThatAreNotOriginFormCannotChooseTheHost() throws {
        for target in ["@127.0.0.1:\(inside.port)/v2/", "http://10.0.0.1:\(inside.port)/v2/",
                       "http://user@127.0.0.1/v2/", "ftp://127.0.0.1/v2/", "v2/"] {
            let answer = try exchange("GET \(target) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            XCTAssertTrue(answer.hasPrefix("HTTP/1.1 400") || answer.hasPrefix("HTTP/1.1 421"), "\(target): \(answer)")
        }
        XCTAssertEqual(inside.requests.count, 0)
        XCTAssertEqual(upstream.requests.count, 0)
    }

    func testAbsoluteFormNamingAConfiguredHostIsServed() throws {
        let answer = try exchange("GET http://127.0.0.1/v2/a/manifests/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n")
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 200"), answer)
        XCTAssertTrue(answer.hasSuffix("upstream\n"), answer)
        XCTAssertEqual(upstream.requests.first?.uri, "/v2/a/manifests/x")
        let other = try exchange("GET http://elsewhere.example/v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        XCTAssertTrue(other.hasPrefix("HTTP/1.1 421"), other)
        // A configured host with another port still names the configured
        // upstream (as a Host header would): the port is never the client's.
        _ = try exchange("GET http://127.0.0.1:\(inside.port)/v2/b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        XCTAssertEqual(upstream.requests.last?.uri, "/v2/b")
        XCTAssertEqual(inside.requests.count, 0)
    }

    func testOptionsStarIsAnsweredLocally() throws {
        let answer = try exchange("OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 200"), answer)
        XCTAssertEqual(upstream.requests.count, 0)
    }

    func testAmbiguousFramingAndHostsAre400() throws {
        let cases = [
            "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1:\(inside.port)\r\n\r\n",
            "GET /v2/ HTTP/1.1\r\n\r\n",
            "POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            "POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
            "POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ]
        for request in cases {
            let answer = try exchange(request)
            XCTAssertTrue(answer.hasPrefix("HTTP/1.1 400"), "\(request.debugDescription) ─► \(answer)")
        }
        XCTAssertEqual(upstream.requests.count, 0, "nothing ambiguous was forwarded")
    }

    func testPipelinedRequestsAreAnsweredInOrder() throws {
        // A local answer, a pass-through (slower: it waits for the
        // upstream) and a local answer again, in one write.
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        socket.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    + "GET /v2/a/manifests/one HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    + "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let answer = String(decoding: socket.receive(), as: UTF8.self)
        let order = ["ok\n", "upstream\n", "ready\n"].map { answer.range(of: $0)?.lowerBound }
        XCTAssertFalse(order.contains(nil), answer)
        if let a = order[0], let b = order[1], let c = order[2] {
            XCTAssertTrue(a < b && b < c, answer)
        }
        XCTAssertEqual(answer.components(separatedBy: "HTTP/1.1 200").count, 4, answer)
    }

    func testErrorBodiesCarryNoInternalDetail() async throws {
        let port = try freePort()  // nobody listens: connection refused
        let lonely = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(port), schema: \"http\"}",
            extraYAML: "timeouts: {connect: 1}")
        for path in ["/v2/a/manifests/x", "/v2/a/blobs/\(F.digest(of: [1, 2, 3]))"] {
            let result = try curl(lonely.base + path)
            XCTAssertEqual(result.code, 502)
            let text = String(decoding: result.body, as: UTF8.self)
            XCTAssertTrue(text.contains("UNAVAILABLE"), text)
            for leak in ["127.0.0.1", String(port), "refused", "NIO", "Error", "errno"] {
                XCTAssertFalse(text.contains(leak), "\(leak) in \(text)")
            }
        }
        await lonely.stop()
    }

    func testABodyStillArrivingAfterAnEarlyAnswerIsNotCountedAsAHead() throws {
        // /healthz answers without reading the body; the 200 KB body that
        // follows is more than the 64 KiB head limit. It must be read as a
        // body, and the next request on the connection served.
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        socket.send("POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 200000\r\n\r\n")
        XCTAssertTrue(socket.receiveHead().hasPrefix("HTTP/1.1 200"))
        XCTAssertEqual(String(decoding: socket.receive(limit: 3), as: UTF8.self), "ok\n")
        socket.send(String(repeating: "x", count: 200_000))
        socket.send("GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        let next = String(decoding: socket.receive(), as: UTF8.self)
        XCTAssertTrue(next.hasPrefix("HTTP/1.1 200"), next)
        XCTAssertTrue(next.hasSuffix("ready\n"), next)
    }
}
