import Foundation
import XCTest
@testable import CacheProxy

/// Several instances behind the real HAProxy with the shipped
/// `deploy/haproxy/haproxy.cfg`, and two tiers of instances, in front of
/// the real distribution registry.
final class ScaleOutTests: XCTestCase {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    func instance(_ registry: Registry, folder: String) throws -> (daemon: Daemon, port: Int) {
        try startProxyProcess(folder: folder, config: """
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(registry.port), schema: "http"}]
            storage: {folder: "\(folder)/cache", fsync: false}
            timeouts: {shutdown: 10}
            log_level: warning
            """)
    }

    func metric(_ port: Int, _ name: String) throws -> Double {
        let text = try shell("curl", ["-s", "http://127.0.0.1:\(port)/metrics"]).output
        return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }
            .flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
    }

    func pull(_ port: Int, _ reference: String) throws -> (Int32, String) {
        let out = try makeTemporaryFolder("pull")
        return try shell("skopeo", ["copy", "--src-tls-verify=false", "docker://127.0.0.1:\(port)/\(reference)",
                                    "dir:\(out)"])
    }

    func testThreeInstancesBehindHAProxyFetchEachBlobOnceAndSurviveARestart() async throws {
        let registry = try Registry()
        let image = try TestImage.make(layerSizes: [200_000, 3_000_000, 50_000, 700_000])
        try image.push(to: "\(registry.address)/test/app:v1")
        // The same layers under a second repository: hashed on the digest,
        // they meet the instance that has them.
        try image.push(to: "\(registry.address)/other/app:v1")
        var instances = try (0..<3).map { _ in try instance(registry, folder: try makeTemporaryFolder("node")) }
        let front = try freePort()
        var config = try String(contentsOfFile: root + "/deploy/haproxy/haproxy.cfg", encoding: .utf8)
        config = config.replacingOccurrences(of: "bind 127.0.0.1:5000", with: "bind 127.0.0.1:\(front)")
        for (index, node) in instances.enumerated() {
            config = config.replacingOccurrences(of: "127.0.0.1:500\(index + 1)", with: "127.0.0.1:\(node.port)")
        }
        let haFolder = try makeTemporaryFolder("haproxy")
        try config.write(toFile: haFolder + "/haproxy.cfg", atomically: true, encoding: .utf8)
        let haproxy = try Daemon("haproxy", ["-db", "-f", haFolder + "/haproxy.cfg"], logPath: haFolder + "/log")
        defer { haproxy.stop() }
        try waitForPort(front)
        try await Task.sleep(for: .milliseconds(1200))  // the health checks' first rounds

        for reference in ["test/app:v1", "test/app:v1", "other/app:v1"] {
            let (status, output) = try pull(front, reference)
            XCTAssertEqual(status, 0, output)
        }
        try await Task.sleep(for: .milliseconds(1200))
        for blob in image.layers + [image.config] {
            XCTAssertEqual(registry.blobGets(blob), 1, "\(blob) fetched once for the whole group")
        }
        let misses = try instances.map { try metric($0.port, "cacheproxy_blob_misses_total") }
        XCTAssertEqual(misses.reduce(0, +), Double(image.layers.count + 1), "misses per instance: \(misses)")

        // One instance gets SIGTERM while a pull of a new image runs: the
        // pull and the next one succeed (HAProxy moves its share on).
        let fresh = try TestImage.make(layerSizes: [8_000_000, 6_000_000, 4_000_000])
        try fresh.push(to: "\(registry.address)/test/fresh:v1")
        let out = try makeTemporaryFolder("pull")
        let pulling = Process()
        pulling.executableURL = URL(fileURLWithPath: try which("skopeo"))
        pulling.arguments = ["copy", "--src-tls-verify=false", "docker://127.0.0.1:\(front)/test/fresh:v1", "dir:\(out)"]
        try pulling.run()
        try await Task.sleep(for: .milliseconds(150))
        let stopped = instances[1]
        stopped.daemon.stop()
        pulling.waitUntilExit()
        XCTAssertEqual(pulling.terminationStatus, 0, "the pull during the stop")
        let (next, nextOutput) = try pull(front, "test/fresh:v1")
        XCTAssertEqual(next, 0, nextOutput)

        // It comes back on its folder and port, with what it had cached.
        let folder = (stopped.daemon.logPath as NSString).deletingLastPathComponent
        let restarted = try Daemon(proxyBinary(), ["--config", folder + "/c.yaml"], logPath: folder + "/log-again")
        try waitForPort(stopped.port)
        instances[1] = (restarted, stopped.port)
        try await Task.sleep(for: .milliseconds(1500))  // back in the ring (rise 2)
        let (again, againOutput) = try pull(front, "test/app:v1")
        XCTAssertEqual(again, 0, againOutput)
        for node in instances { node.daemon.stop() }
        registry.stop()
    }

    func testTwoTiersBothCacheAndAccessChecksHoldThroughBoth() async throws {
        let registry = try Registry(users: ["alice": "wonderland"])
        let image = try TestImage.make(layerSizes: [100_000, 20_000])
        try image.push(to: "\(registry.address)/private/app:v1", credentials: "alice:wonderland")
        let regional = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}")
        let edge = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(regional.port), schema: \"http\"}")
        let out = try makeTemporaryFolder("pull")
        let (status, output) = try shell("skopeo", ["copy", "--src-tls-verify=false", "--src-creds", "alice:wonderland",
                                                    "docker://127.0.0.1:\(edge.port)/private/app:v1", "dir:\(out)"])
        XCTAssertEqual(status, 0, output)
        let expected = Set(image.layers + [image.config, image.manifest])
        for tier in [regional, edge] {
            let cached = Set(tier.files(in: "blobs").map { "sha256:" + ($0.split(separator: "/").last ?? "") })
            XCTAssertEqual(cached, expected, "both tiers cache")
        }
        for layer in image.layers {
            let stranger = try curl("\(edge.base)/v2/private/app/blobs/\(layer)")
            XCTAssertEqual(stranger.code, 401, "a stranger at the edge is refused through both tiers")
            let alice = try curl("\(edge.base)/v2/private/app/blobs/\(layer)", ["-u", "alice:wonderland"])
            XCTAssertEqual(alice.code, 200)
            XCTAssertEqual(TestImage.digest(alice.body), layer)
        }
        XCTAssertEqual(try curl("\(edge.base)/v2/private/app/manifests/v1").code, 401)
        try await Task.sleep(for: .milliseconds(1200))
        for layer in image.layers { XCTAssertEqual(registry.blobGets(layer), 1) }
        await edge.stop()
        await regional.stop()
        registry.stop()
    }
}
