import XCTest
@testable import CacheProxy

final class ConfigTests: XCTestCase {
    /// Found by the config fuzzer: an empty key gave `config: : unknown key`.
    func testAnEmptyKeyIsNamed() {
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: "? \napi: {port: 1}\n")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "\"\"", "\(error)")
        }
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: "api: {port: 1, \"\": 2}\n")) { error in
            XCTAssertEqual((error as? ConfigError)?.key, "api.\"\"", "\(error)")
        }
    }

    func testReferenceDesignFileWorksUnchanged() throws {
        let c = try ConfigLoader.parse(yaml: """
            api:
              hostname: "0.0.0.0"
              port: "5000"
            upstreams:
              - host: "docker.mirror.local:5000"
                registry: "registry-1.docker.io"
                port: 443
                schema: "https"
            storage:
              folder: "/var/cache/cache-proxy"
            """)
        XCTAssertEqual(c.api.port, 5000)
        XCTAssertEqual(c.api.hostname, "0.0.0.0")
        XCTAssertEqual(c.upstreams.first?.origin, "https://registry-1.docker.io")
        XCTAssertEqual(c.storage.folder, "/var/cache/cache-proxy")
        XCTAssertEqual(c.maxHeaderBytes, 65536)
        XCTAssertEqual(c.timeouts.headerReadSeconds, 30)
        XCTAssertTrue(c.storage.fsync)
    }

    func testFlowStyleAndIntegerPort() throws {
        let c = try ConfigLoader.parse(yaml: """
            api: {hostname: "127.0.0.1", port: 5001}
            upstreams: [{host: "h", registry: "r", port: "5000", schema: "http"}]
            storage: {folder: "./cache", fsync: false}
            timeouts: {upstream: 2.5}
            """)
        XCTAssertEqual(c.upstreams[0].origin, "http://r:5000")
        XCTAssertEqual(c.timeouts.upstreamSeconds, 2.5)
        XCTAssertFalse(c.storage.fsync)
    }

    func testTheShippedConfigLoads() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../config.yaml").path
        let c = try ConfigLoader.load(path: path)
        XCTAssertEqual(c.upstreams.first?.host, "localhost:5000")
        XCTAssertEqual(c.upstreams.first?.registry, "registry-1.docker.io")
        XCTAssertEqual(c.storage.folder, "./cache")
    }

    func testErrorsNameTheKey() {
        let base = (api: "api: {port: 5000}", up: "upstreams: [{host: h, registry: r}]", st: "storage: {folder: /x}")
        let cases: [(String, String)] = [
            ("\(base.up)\n\(base.st)", "api"),
            ("\(base.api)\n\(base.st)", "upstreams"),
            ("\(base.api)\n\(base.up)", "storage"),
            ("api: {port: 70000}\n\(base.up)\n\(base.st)", "api.port"),
            ("api: {port: \"http\"}\n\(base.up)\n\(base.st)", "api.port"),
            ("api: {port: 5000, colour: red}\n\(base.up)\n\(base.st)", "api.colour"),
            ("\(base.api)\nupstreams: [{host: h, registry: r, schema: ftp}]\n\(base.st)", "upstreams[0].schema"),
            ("\(base.api)\nupstreams: [{host: h}]\n\(base.st)", "upstreams[0].registry"),
            ("\(base.api)\nupstreams: [{host: h, registry: r, port: 0}]\n\(base.st)", "upstreams[0].port"),
            ("\(base.api)\nupstreams: {host: h}\n\(base.st)", "upstreams"),
            ("\(base.api)\n\(base.up)\nstorage: {folder: 5}", "storage.folder"),
            ("\(base.api)\n\(base.up)\n\(base.st)\nextra: 1", "extra"),
            ("\(base.api)\n\(base.up)\n\(base.st)\ntimeouts: {upstream: -1}", "timeouts.upstream"),
            ("\(base.api)\n\(base.up)\n\(base.st)\nlog_level: loud", "log_level"),
            ("\(base.api)\nupstreams: [{host: h, registry: r}, {host: h, registry: s}]\n\(base.st)", "upstreams[1].host"),
            // A port in the registry's name would silently escape its TLS
            // settings and the realm and redirect rules: `port` is the key.
            ("\(base.api)\nupstreams: [{host: h, registry: \"r:5000\"}]\n\(base.st)", "upstreams[0].registry"),
            ("\(base.api)\nupstreams: [{host: h, registry: \"::1\"}]\n\(base.st)", "upstreams[0].registry"),
            ("\(base.api)\nupstreams: [{host: h, registry: r, max_fills: 0}]\n\(base.st)", "upstreams[0].max_fills"),
        ]
        assertConfigErrors(cases)
    }
}
