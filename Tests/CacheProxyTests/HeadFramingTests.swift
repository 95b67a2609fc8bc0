import Foundation
import XCTest
@testable import CacheProxy

/// An answer to a `HEAD` has no body, however the upstream framed it: a
/// `HEAD` then a `GET` on one keep-alive connection read as exactly two
/// answers.
final class HeadFramingTests: XCTestCase {
    func testAHeadAnswerCarriesNoBodyWhateverItsFraming() async throws {
        let framings: [(name: String, head: String, close: Bool)] = [
            ("chunked", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            ("close-delimited", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", true),
            ("content-length", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n", false),
        ]
        for framing in framings {
            let upstream = try await ScriptedUpstream { line in
                if line.hasPrefix("HEAD ") { return (framing.head, framing.close) }
                return ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", false)
            }
            let proxy = try await TestProxy(upstreamsYAML:
                "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
            let socket = try RawSocket(port: proxy.port, receiveTimeout: 1)
            socket.send("HEAD /v2/a/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            let head = socket.receiveHead()
            XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), "\(framing.name): \(head)")
            socket.send("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            let second = socket.receiveHead()
            XCTAssertTrue(second.hasPrefix("HTTP/1.1 200"), "\(framing.name): the second answer starts where the first ended: \(second.debugDescription)")
            XCTAssertTrue(second.lowercased().contains("content-length: 2\r\n"), "\(framing.name): \(second)")
            // Exactly the GET's two body bytes follow, then nothing.
            let rest = socket.receive(limit: 64)
            XCTAssertEqual(String(decoding: rest, as: UTF8.self), "{}", framing.name)
            socket.close()
            await proxy.stop()
            await upstream.stop()
        }
    }
}
