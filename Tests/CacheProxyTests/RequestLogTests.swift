import Foundation
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// One line per request, as text or JSON, with how it was answered, and
/// never a credential: the binary's own standard error, read back.
final class RequestLogTests: XCTestCase {
    let layer = Array(repeating: UInt8(ascii: "z"), count: 100_000)
    var digest: String { TestImage.digest(Data(layer)) }

    func run(format: String) async throws -> (lines: [String], port: Int) {
        let layer = self.layer
        let upstream = try await FakeUpstream { head in
            head.uri.contains("/blobs/") ? .init(body: layer) : .init(body: Array(#"{"tags":[]}"#.utf8))
        }
        defer { Task { await upstream.stop() } }
        let folder = try makeTemporaryFolder("log")
        let (daemon, port) = try startProxyProcess(folder: folder, config: """
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(folder)/cache", fsync: false}
            """, arguments: ["--log-format", format])
        let base = "http://127.0.0.1:\(port)"
        let secrets = ["-H", "Authorization: Bearer sekr1t-token", "-H", "Cookie: session=sekr1t-cookie"]
        XCTAssertEqual(try curl("\(base)/v2/lib/app/blobs/\(digest)", secrets).code, 200)  // miss
        XCTAssertEqual(try curl("\(base)/v2/lib/app/blobs/\(digest)", secrets).code, 200)  // hit
        XCTAssertEqual(try curl("\(base)/v2/lib/app/tags/list?n=1&token=sekr1t-query", secrets).code, 200)
        XCTAssertEqual(try curl("\(base)/healthz").code, 200)
        XCTAssertEqual(try curl("\(base)/v2/lib/app/blobs/sha256:nothex").code, 400)
        try await Task.sleep(for: .milliseconds(300))
        daemon.stop()
        let log = daemon.log
        XCTAssertFalse(log.contains("sekr1t"), "no credential, cookie or query in the log:\n\(log)")
        return (log.split(separator: "\n").map(String.init), port)
    }

    func testJSONLinesParseAndSayHowEachRequestWasAnswered() async throws {
        let (lines, _) = try await run(format: "json")
        var requests: [[String: Any]] = []
        for line in lines {
            let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any]
            XCTAssertNotNil(object, "not a JSON object: \(line)")
            if object?["type"] as? String == "request", let object { requests.append(object) }
        }
        XCTAssertEqual(requests.map { $0["answer"] as? String }, ["miss", "hit", "passthrough", "local", "error"])
        XCTAssertEqual(requests.map { $0["status"] as? Int }, [200, 200, 200, 200, 400])
        let first = try XCTUnwrap(requests.first)
        XCTAssertEqual(first["method"] as? String, "GET")
        XCTAssertEqual(first["path"] as? String, "/v2/lib/app/blobs/\(digest)")
        XCTAssertEqual(first["client"] as? String, "127.0.0.1")
        XCTAssertEqual(first["upstream"] as? String, "127.0.0.1")
        XCTAssertEqual(first["bytes"] as? Int, layer.count)
        XCTAssertEqual(requests[1]["bytes"] as? Int, layer.count, "the event-loop hit path logs too")
        XCTAssertEqual(requests[2]["path"] as? String, "/v2/lib/app/tags/list", "the query is left out")
        XCTAssertNotNil(first["duration_seconds"] as? Double)
        XCTAssertNotNil(first["time"] as? String)
        XCTAssertTrue(lines.contains { $0.contains(#""type":"log""#) && $0.contains("listening") }, "the logs are JSON too")
    }

    func testTextLinesAreOnePerRequest() async throws {
        let (lines, _) = try await run(format: "text")
        let requests = lines.filter { $0.contains(" answer=") }
        XCTAssertEqual(requests.count, 5, lines.joined(separator: "\n"))
        XCTAssertTrue(requests[0].contains(" 127.0.0.1 GET /v2/lib/app/blobs/\(digest) host=127.0.0.1:"), requests[0])
        XCTAssertTrue(requests[0].contains(" status=200 bytes=100000 duration="), requests[0])
        XCTAssertTrue(requests[0].hasSuffix(" answer=miss"), requests[0])
        XCTAssertTrue(requests[1].hasSuffix("answer=hit"), requests[1])
    }

    func testAHostileHostCannotBreakALine() {
        let entry = RequestLog.Entry(client: "10.0.0.1", method: "GET", uri: "/v2/a/tags/list?x=1",
                                     host: "evil\"\n{\"injected\":1}", upstream: nil, status: 404, bytes: 0,
                                     seconds: 0.001, answer: .error)
        let json = RequestLog.line(entry, format: .json, time: Date(timeIntervalSince1970: 0))
        XCTAssertEqual(json.filter { $0 == "\n" }.count, 1)
        let object = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        XCTAssertEqual(object?["host"] as? String, "evil\"\n{\"injected\":1}")
        XCTAssertEqual(object?["time"] as? String, "1970-01-01T00:00:00.000Z")
        let text = RequestLog.line(entry, format: .text, time: Date(timeIntervalSince1970: 0))
        XCTAssertEqual(text.filter { $0 == "\n" }.count, 1)
        XCTAssertTrue(text.contains("host=evil__{_injected_:1} "), text)
    }
}
