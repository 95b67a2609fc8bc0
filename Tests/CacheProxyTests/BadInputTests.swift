import Foundation
import XCTest
@testable import CacheProxy

/// Hostile or broken clients: each gets a 4xx or a closed connection, and the
/// proxy keeps serving the next client.
final class BadInputTests: XCTestCase {
    var upstream: FakeUpstream!
    var proxy: TestProxy!

    override func setUp() async throws {
        upstream = try await FakeUpstream { _ in .init(body: Array("{}".utf8)) }
        proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {header_read: 1, idle: 1}")
    }

    override func tearDown() async throws {
        try assertStillServing()
        await proxy.stop()
        await upstream.stop()
    }

    func assertStillServing(file: StaticString = #filePath, line: UInt = #line) throws {
        let health = try curl(proxy.base + "/healthz")
        XCTAssertEqual(health.code, 200, "the proxy must keep serving", file: file, line: line)
    }

    func exchange(_ request: String) throws -> String {
        let socket = try RawSocket(port: proxy.port)
        socket.send(request)
        return String(decoding: socket.receive(), as: UTF8.self)
    }

    /// Found by the route fuzzer: `/blobs/` right after `/v2` (no
    /// repository name) once cut the path with a reversed range, a trap that
    /// took the whole proxy down.
    func testABlobPathWithoutARepositoryNameIs400() throws {
        let digest = "sha256:" + String(repeating: "a", count: 64)
        for path in ["/v2/blobs/9f8", "/v2/blobs/\(digest)", "/v2//blobs/\(digest)"] {
            for method in ["GET", "HEAD"] {
                XCTAssertThrowsError(try RequestTarget.classify(method: method, uri: path), path)
                let answer = try exchange("\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                XCTAssertTrue(answer.hasPrefix("HTTP/1.1 400"), "\(method) \(path) ─► \(answer)")
                try assertStillServing()
            }
        }
    }

    func testMalformedRequestLine() throws {
        for garbage in ["GARBAGE\r\n\r\n", "GET /v2/\r\n\r\n", "GET /v2/ HTTP/9.9 extra\r\n\r\n", "\u{1}\u{2}\u{3}\r\n\r\n"] {
            let answer = try exchange(garbage)
            XCTAssertTrue(answer.isEmpty || answer.hasPrefix("HTTP/1.1 400"), "\(garbage.debugDescription) ─► \(answer)")
        }
    }

    func testOversizedHeadIs431() throws {
        let big = String(repeating: "a", count: 70 * 1024)
        let answer = try exchange("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: \(big)\r\n\r\n")
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 431"), answer)
        XCTAssertTrue(answer.contains(#""code":"TOO_LARGE""#))
        // Just under the limit is fine.
        let fits = String(repeating: "b", count: 60 * 1024)
        let ok = try exchange("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fits: \(fits)\r\nConnection: close\r\n\r\n")
        XCTAssertTrue(ok.hasPrefix("HTTP/1.1 200"), String(ok.prefix(200)))
    }

    func testManySmallHeadersOverTheLimitAre431() throws {
        let headers = (0..<2000).map { "X-H\($0): \(String(repeating: "v", count: 40))\r\n" }.joined()
        let answer = try exchange("GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\(headers)\r\n")
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 431"), String(answer.prefix(200)))
    }

    func testPathTraversalRawAndEncoded() throws {
        let digest = "sha256:" + String(repeating: "a", count: 64)
        for path in ["/v2/../../etc/passwd", "/v2/a/../../../blobs/\(digest)", "/v2/a/%2e%2e/%2e%2e/blobs/\(digest)",
                     "/v2/a/blobs/sha256:..%2f..%2fetc", "/v2/a%2F..%2Fb/blobs/\(digest)", "/v2/a/blobs/..%5c..%5cx"] {
            let r = try shell("curl", ["-s", "--path-as-is", "-w", "\n%{http_code}", proxy.base + path]).output
            XCTAssertTrue(r.hasSuffix("400"), "\(path) ─► \(r)")
            XCTAssertTrue(r.contains(#"{"errors":[{"code":"#), r)
        }
        XCTAssertEqual(upstream.requests.count, 0, "nothing was forwarded")
    }

    func testUnsupportedDigestAlgorithm() throws {
        for digest in ["md5:d41d8cd98f00b204e9800998ecf8427e", "sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709",
                       "sha256:xyz", "sha256:" + String(repeating: "A", count: 64)] {
            let r = try curl("\(proxy.base)/v2/a/blobs/\(digest)")
            XCTAssertEqual(r.code, 400, digest)
            XCTAssertTrue(String(decoding: r.body, as: UTF8.self).contains(#""code":"DIGEST_INVALID""#), digest)
        }
    }

    func testSlowHeadersAreCut() throws {
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        let started = Date()
        XCTAssertTrue(socket.send("GET /v2/ HTTP/1.1\r\n"))
        // Trickle a header byte every 200 ms: an idle timer would never fire.
        var cut = false
        for _ in 0..<25 {
            usleep(200_000)
            if !socket.send("X") { cut = true; break }
        }
        let rest = socket.receive()
        XCTAssertTrue(cut || rest.isEmpty, "connection must be closed, got \(String(decoding: rest, as: UTF8.self))")
        XCTAssertLessThan(Date().timeIntervalSince(started), 4, "header_read is 1 s")
    }

    func testKeepAliveRequestsSpacedWithinTheDeadlineAreServed() throws {
        // header_read and idle are 1 s: each head comes 0.6 s after the last response,
        // 1.8 s in all on one connection, and then the idle one is closed.
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        for _ in 0..<3 {
            usleep(600_000)
            XCTAssertTrue(socket.send("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
            let head = socket.receiveHead()
            XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), head)
            XCTAssertEqual(String(decoding: socket.receive(limit: 3), as: UTF8.self), "ok\n")
        }
        let started = Date()
        XCTAssertEqual(socket.receive(), [])
        XCTAssertLessThan(Date().timeIntervalSince(started), 2.5)
    }

    func testIdleConnectionWithoutARequestIsClosed() throws {
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        let started = Date()
        XCTAssertEqual(socket.receive(), [])
        XCTAssertLessThan(Date().timeIntervalSince(started), 4)
    }
}

/// Start-up of the store: what an earlier run left in `tmp/` goes, stray
/// files under `blobs/` are never indexed or served.
final class BlobStoreStartupTests: XCTestCase {
    func testTemporaryFolderIsEmptiedAndStrayFilesIgnored() throws {
        let folder = try makeTemporaryFolder("store")
        let good = String(repeating: "ab", count: 32)
        try FileManager.default.createDirectory(atPath: folder + "/tmp", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: folder + "/blobs/sha256/ab", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: folder + "/blobs/sha256/cd", withIntermediateDirectories: true)
        try Data("half".utf8).write(to: URL(fileURLWithPath: folder + "/tmp/sha256-partial.1"))
        try Data("blob".utf8).write(to: URL(fileURLWithPath: folder + "/blobs/sha256/ab/\(good)"))
        try Data("x".utf8).write(to: URL(fileURLWithPath: folder + "/blobs/sha256/ab/not-a-digest"))
        try Data("x".utf8).write(to: URL(fileURLWithPath: folder + "/blobs/sha256/cd/\(good)"))  // wrong prefix folder

        let store = try makeStore(folder)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder + "/tmp"), [])
        XCTAssertEqual(store.size(of: try Digest(parsing: "sha256:\(good)")), 4)
        let other = try Digest(parsing: "sha256:" + String(repeating: "cd", count: 32))
        XCTAssertNil(store.size(of: other))
    }
}
