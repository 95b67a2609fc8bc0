import Foundation
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// The shipped Grafana dashboard against the real Prometheus server:
/// Prometheus scrapes the proxy while it serves traffic, then every panel's
/// expression is asked of Prometheus's HTTP API and must return data that
/// agrees with the traffic made.
final class DashboardTests: XCTestCase {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    func query(_ port: Int, _ expression: String) throws -> [(labels: [String: String], value: Double)] {
        let answer = try curl("http://127.0.0.1:\(port)/api/v1/query", ["-G", "--data-urlencode", "query=\(expression)"])
        let object = try XCTUnwrap(try JSONSerialization.jsonObject(with: answer.body) as? [String: Any], expression)
        XCTAssertEqual(object["status"] as? String, "success", "\(expression): \(String(decoding: answer.body, as: UTF8.self))")
        let results = ((object["data"] as? [String: Any])?["result"] as? [[String: Any]]) ?? []
        return results.map { result in
            let value = (result["value"] as? [Any])?.last as? String
            return ((result["metric"] as? [String: String]) ?? [:], value.flatMap(Double.init) ?? .nan)
        }
    }

    func testEveryPanelShowsTheTrafficPrometheusScraped() async throws {
        let blobs = (0..<4).map { index in Array(repeating: UInt8(65 + index), count: 120_000) }
        let bad = Array(repeating: UInt8(ascii: "x"), count: 1000)
        let badDigest = "sha256:" + String(repeating: "0", count: 64)
        let manifest = Array(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.utf8)
        let manifestDigest = TestImage.digest(Data(manifest))
        let upstream = try await FakeUpstream { head in
            if head.uri.contains("/manifests/") {
                return .init(headers: ["content-type": "application/vnd.oci.image.manifest.v1+json",
                                       "docker-content-digest": manifestDigest, "ratelimit-remaining": "42;w=21600"],
                             body: manifest)
            }
            if head.uri.contains(badDigest) { return .init(body: bad) }
            return .init(body: blobs.first { head.uri.contains(TestImage.digest(Data($0))) } ?? [])
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
                                        storageYAML: ", max_size: 300000")
        let folder = try makeTemporaryFolder("prometheus")
        let port = try freePort()
        try """
            global: {scrape_interval: 1s, evaluation_interval: 1s}
            scrape_configs:
              - job_name: cache-proxy
                static_configs: [{targets: ["127.0.0.1:\(proxy.port)"]}]
            """.write(toFile: folder + "/prometheus.yml", atomically: true, encoding: .utf8)
        let prometheus = try Daemon("prometheus", ["--config.file=\(folder)/prometheus.yml",
                                                   "--storage.tsdb.path=\(folder)/data",
                                                   "--web.listen-address=127.0.0.1:\(port)"], logPath: folder + "/log")
        defer { prometheus.stop() }
        try waitForPort(port)
        // Traffic only once Prometheus scrapes: every series then has a
        // sample from before it and after it.
        for _ in 0..<100 {
            let up = try curl("http://127.0.0.1:\(port)/api/v1/query", ["-G", "--data-urlencode", "query=up == 1"])
            if String(decoding: up.body, as: UTF8.self).contains("\"job\":\"cache-proxy\"") { break }
            try await Task.sleep(for: .milliseconds(200))
        }
        try await Task.sleep(for: .milliseconds(1500))

        // Two rounds of traffic with scrapes between, so every series has
        // moved between two samples.
        for _ in 0..<2 {
            for blob in blobs {
                for _ in 0..<3 { _ = try curl("\(proxy.base)/v2/lib/app/blobs/\(TestImage.digest(Data(blob)))") }
            }
            _ = try curl("\(proxy.base)/v2/lib/app/blobs/\(badDigest)")
            for _ in 0..<3 { _ = try curl("\(proxy.base)/v2/lib/app/manifests/latest") }
            _ = try curl("\(proxy.base)/healthz")
            try await Task.sleep(for: .milliseconds(2500))
        }

        let dashboard = try XCTUnwrap(try JSONSerialization.jsonObject(
            with: Data(contentsOf: URL(fileURLWithPath: root + "/deploy/grafana/cache-proxy.json"))) as? [String: Any])
        let panels = try XCTUnwrap(dashboard["panels"] as? [[String: Any]])
        XCTAssertGreaterThanOrEqual(panels.count, 16)
        var byTitle: [String: [[(labels: [String: String], value: Double)]]] = [:]
        for panel in panels {
            let title = panel["title"] as? String ?? "?"
            for target in (panel["targets"] as? [[String: Any]]) ?? [] {
                let expression = (target["expr"] as? String ?? "").replacingOccurrences(of: "$job", with: ".*")
                let results = try query(port, expression)
                XCTAssertFalse(results.isEmpty, "\(title): no data for \(expression)")
                byTitle[title, default: []].append(results)
            }
        }
        func value(_ title: String, _ target: Int = 0, where match: (([String: String]) -> Bool) = { _ in true }) -> Double {
            byTitle[title]?[safe: target]?.first { match($0.labels) }?.value ?? .nan
        }
        let hitRatio = value("Blob hit ratio")
        XCTAssertTrue(hitRatio > 0.3 && hitRatio <= 1, "blob hit ratio \(hitRatio)")
        XCTAssertGreaterThan(value("Manifest hit ratio"), 0.5)
        XCTAssertGreaterThan(value("Bytes served: cache vs upstream", where: { $0["source"] == "cache" }), 0)
        XCTAssertGreaterThan(value("Requests by kind", where: { $0["kind"] == "manifest" }), 0)
        XCTAssertGreaterThan(value("Requests by kind", where: { $0["kind"] == "local" }), 0)
        XCTAssertEqual(value("Upstream rate limit remaining"), 42)
        XCTAssertGreaterThan(value("Upstream requests by method and code", where: { $0["method"] == "HEAD" }), 0)
        XCTAssertGreaterThan(value("Errors", 0), 0, "the bad blob's digest mismatches")
        XCTAssertGreaterThan(value("Evictions"), 0, "max_size 300000 with 480000 bytes of blobs")
        XCTAssertEqual(value("Cache size", 1), 300_000)
        XCTAssertLessThanOrEqual(value("Cache size", 0), 300_000)
        XCTAssertGreaterThan(value("Access checks", where: { $0["result"] == "remembered" }), 0)
        XCTAssertGreaterThan(value("Process CPU"), 0)
        XCTAssertGreaterThan(value("Process memory"), 1_000_000)
        await proxy.stop()
        await upstream.stop()
    }
}

extension Array {
    subscript(safe index: Int) -> Element? { indices.contains(index) ? self[index] : nil }
}
