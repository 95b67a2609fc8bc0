import Foundation
import XCTest

/// The `cache-proxy` binary itself: flags, config errors, SIGTERM.
final class CommandLineTests: XCTestCase {
    var binary: String {
        // The products folder (.build/<triple>/<config>/) holds the test
        // bundle and the executable; Linux and macOS name the bundle's URL
        // differently, so look in both places.
        let bundle = Bundle(for: Self.self).bundleURL
        let candidates = [bundle, bundle.deletingLastPathComponent()].map { $0.appendingPathComponent("cache-proxy").path }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }

    func testBadConfigStopsTheStartWithOneLineNamingTheKey() throws {
        let folder = try makeTemporaryFolder("cli")
        let cases = [
            ("api: {port: 70000}\nupstreams: [{host: h, registry: r}]\nstorage: {folder: /tmp/x}", "api.port"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: r, schema: gopher}]\nstorage: {folder: /tmp/x}",
             "upstreams[0].schema"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: r}]\nstorage: {folder: /tmp/x}\nsurprise: 1", "surprise"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: r}]", "storage"),
        ]
        for (yaml, key) in cases {
            try yaml.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
            let (status, output) = try shell(binary, ["--config", folder + "/c.yaml"])
            XCTAssertNotEqual(status, 0)
            let lines = output.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, output)
            XCTAssertTrue(output.contains(key), "\(key) not named in: \(output)")
        }
        let (status, output) = try shell(binary, ["--config", folder + "/missing.yaml"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("missing.yaml"), output)
    }

    func testFlagsOverrideAndSIGTERMExitsCleanly() throws {
        let folder = try makeTemporaryFolder("cli")
        try """
            api: {hostname: "127.0.0.1", port: "1"}
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: 9, schema: "http"}]
            storage: {folder: "/nonexistent/never-used"}
            """.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
        let port = try freePort()
        let daemon = try Daemon(binary, ["--config", folder + "/c.yaml", "--port", String(port), "--storage", folder + "/cache"],
                                logPath: folder + "/log")
        try waitForPort(port)
        XCTAssertEqual(try curl("http://127.0.0.1:\(port)/readyz").code, 200)
        XCTAssertTrue(FileManager.default.fileExists(atPath: folder + "/cache/blobs"), "--storage was used")
        let started = Date()
        kill(daemon.process.processIdentifier, SIGTERM)
        daemon.process.waitUntilExit()
        XCTAssertEqual(daemon.process.terminationStatus, 0, daemon.log)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder + "/cache/tmp"), [])
    }
}
