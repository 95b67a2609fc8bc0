import Foundation
import XCTest
@testable import CacheProxy

/// SIGHUP to the binary: the whole configuration is read again; what can
/// change live changes for new requests, what cannot is kept and named,
/// a broken file changes nothing, and transfers under way finish.
final class ReloadTests: XCTestCase {
    func testSIGHUPPutsANewConfigurationInForceAndKeepsWhatIsUnderWay() async throws {
        let slow = Array(repeating: UInt8(ascii: "s"), count: 600_000)
        let slowDigest = TestImage.digest(Data(slow))
        let a = try await FakeUpstream { head in
            // A slow download: it is still running when its upstream goes.
            .init(body: head.uri.contains(slowDigest) ? slow : Array("{\"from\":\"a\"}".utf8), chunkSize: 60_000,
                  delay: head.uri.contains(slowDigest) ? .milliseconds(150) : .zero)
        }
        let b = try await FakeUpstream { head in
            .init(body: Array("{\"from\":\"b\"}".utf8), headDelay: head.uri.contains("slowhead") ? .seconds(3) : .zero)
        }
        let folder = try makeTemporaryFolder("reload")
        let port = try freePort()
        func write(_ upstreams: String, extra: String = "") throws {
            try """
                api: {hostname: "127.0.0.1", port: \(port)}
                upstreams:
                \(upstreams)
                storage: {folder: "\(folder)/cache", fsync: false}
                \(extra)
                """.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
        }
        let hostA = "  - {host: \"a.test\", registry: \"127.0.0.1\", port: \(a.port), schema: \"http\"}"
        let hostB = "  - {host: \"b.test\", registry: \"127.0.0.1\", port: \(b.port), schema: \"http\"}"
        try write(hostA)
        let daemon = try Daemon(proxyBinary(), ["--config", folder + "/c.yaml"], logPath: folder + "/log")
        defer { daemon.stop() }
        try waitForPort(port)
        let base = "http://127.0.0.1:\(port)"
        func get(_ host: String, _ path: String = "/v2/lib/app/tags/list", _ extra: [String] = []) throws -> (Int, String) {
            let r = try curl(base + path, ["-H", "Host: \(host)"] + extra)
            return (r.code, String(decoding: r.body, as: UTF8.self))
        }
        /// SIGHUP, then waits (up to 10 s, for a slow machine) until the
        /// reload has been logged as done, either way.
        func hangUp() async throws {
            let seen = daemon.log.components(separatedBy: "SIGHUP: reloading").count
            kill(daemon.process.processIdentifier, SIGHUP)
            for _ in 0..<200 {
                let log = daemon.log
                let after = log.components(separatedBy: "SIGHUP: reloading").dropFirst(seen).joined()
                if log.components(separatedBy: "SIGHUP: reloading").count > seen,
                   after.contains("configuration reloaded") || after.contains("configuration not reloaded") {
                    return
                }
                try await Task.sleep(for: .milliseconds(50))
            }
            XCTFail("no reload logged:\n\(daemon.log)")
        }
        XCTAssertEqual(try get("b.test").0, 404, "b is not configured yet")

        // A download through a is under way when a is removed and b added.
        let download = Process()
        download.executableURL = URL(fileURLWithPath: try which("curl"))
        let out = folder + "/slow"
        download.arguments = ["-s", "-o", out, "-H", "Host: a.test", "\(base)/v2/lib/app/blobs/\(slowDigest)"]
        try download.run()
        try await Task.sleep(for: .milliseconds(300))
        try write(hostB, extra: "limits: {max_header_bytes: 2048}")
        try await hangUp()
        XCTAssertEqual(try get("b.test").1, "{\"from\":\"b\"}", "b added")
        XCTAssertEqual(try get("a.test").0, 404, "a removed")
        download.waitUntilExit()
        XCTAssertEqual(download.terminationStatus, 0)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: out)), Data(slow), "the download finished whole")
        // Limits apply to new connections.
        XCTAssertEqual(try get("b.test", "/v2/lib/app/tags/list", ["-H", "X-Big: " + String(repeating: "x", count: 3000)]).0, 431)

        // Upstream timeouts: a 1-second answer limit now cuts a 3-second wait.
        try write(hostB, extra: "limits: {max_header_bytes: 2048}\ntimeouts: {upstream: 1}")
        try await hangUp()
        let started = Date()
        XCTAssertEqual(try get("b.test", "/v2/lib/slowhead/tags/list").0, 504)
        XCTAssertLessThan(Date().timeIntervalSince(started), 2.5)

        // An upstream changed in place: b.test now points at a's registry.
        let bToA = "  - {host: \"b.test\", registry: \"127.0.0.1\", port: \(a.port), schema: \"http\", offline: deny}"
        try write(bToA)
        try await hangUp()
        XCTAssertEqual(try get("b.test").1, "{\"from\":\"a\"}", "b.test repointed")
        XCTAssertTrue(daemon.log.contains("its offline memory is forgotten"), daemon.log)
        try write(hostB, extra: "limits: {max_header_bytes: 2048}\ntimeouts: {upstream: 1}")
        try await hangUp()

        // A file that does not load changes nothing, and says which key.
        try write(hostB + "\n    surprise: 1")
        try await hangUp()
        XCTAssertEqual(try get("b.test").1, "{\"from\":\"b\"}")
        XCTAssertTrue(daemon.log.contains("surprise"), daemon.log)

        // A key that needs a restart keeps its value; the rest applies.
        try write(hostA + "\n" + hostB, extra: "log_level: warning")
        var text = try String(contentsOfFile: folder + "/c.yaml", encoding: .utf8)
        text = text.replacingOccurrences(of: "port: \(port)}", with: "port: \(port + 1)}")
        try text.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
        try await Task.sleep(for: .milliseconds(200))  // request lines are written every 20 ms
        let before = daemon.log.count
        try await hangUp()
        XCTAssertEqual(try get("a.test").1, "{\"from\":\"a\"}", "a is back on the old port")
        let after = String(daemon.log.dropFirst(before))
        XCTAssertTrue(after.contains("needs a restart") && after.contains("api.port"), after)
        XCTAssertFalse(after.contains("answer="), "log_level: warning took effect: no request lines\n\(after)")
        await a.stop()
        await b.stop()
    }
}
