import Crypto
import Foundation
import XCTest
@testable import CacheProxy

/// The proxy in front of the real distribution registry, driven by real
/// clients: skopeo for pull and push, curl for single requests.
final class RegistryEndToEndTests: XCTestCase {
    func sha256(ofFile path: String) throws -> String {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return "sha256:" + SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }

    func proxyFor(_ registry: Registry) async throws -> TestProxy {
        try await TestProxy(upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}",
                            extraYAML: "timeouts: {connect: 1, upstream: 5}")
    }

    func testSkopeoPullsThroughTheProxyAndCachedBlobsOutliveTheUpstream() async throws {
        let registry = try Registry()
        let image = try TestImage.make()
        try image.push(to: "\(registry.address)/test/app:v1")
        let proxy = try await proxyFor(registry)

        for round in 1...2 {
            let out = try makeTemporaryFolder("pull")
            let (status, output) = try shell("skopeo", ["copy", "--src-tls-verify=false",
                                                        "docker://127.0.0.1:\(proxy.port)/test/app:v1", "dir:\(out)"])
            XCTAssertEqual(status, 0, output)
            for digest in image.layers + [image.config] {
                let hex = digest.dropFirst("sha256:".count)
                XCTAssertEqual(try sha256(ofFile: "\(out)/\(hex)"), digest, "round \(round)")
            }
        }
        let cached = Set(proxy.files(in: "blobs").map { "sha256:" + ($0.split(separator: "/").last ?? "") })
        XCTAssertEqual(cached, Set(image.layers + [image.config, image.manifest]), "every blob and the manifest")
        try await Task.sleep(for: .milliseconds(1200))  // distribution's access log is written after the response
        for layer in image.layers {
            XCTAssertEqual(registry.blobGets(layer), 1, "the second pull came from the cache")
        }
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_blob_hits_total"), 4)

        registry.stop()
        for layer in image.layers {
            let r = try curl("\(proxy.base)/v2/test/app/blobs/\(layer)")
            XCTAssertEqual(r.code, 200)
            XCTAssertEqual("sha256:" + SHA256.hash(data: r.body).map { String(format: "%02x", $0) }.joined(), layer)
        }
        // A tag never pulled has nothing to fall back on.
        let manifest = try curl("\(proxy.base)/v2/test/app/manifests/v2")
        XCTAssertEqual(manifest.code, 502, "no digest was ever named for this tag")
        XCTAssertTrue(String(decoding: manifest.body, as: UTF8.self).contains(#"{"errors":[{"code":"UNAVAILABLE""#))
        await proxy.stop()
    }

    func testPushThroughTheProxyStreamsUploadsAndRewritesLocation() async throws {
        let registry = try Registry()
        let proxy = try await proxyFor(registry)
        let image = try TestImage.make(layerSizes: [2_000_000, 10])
        try image.push(to: "127.0.0.1:\(proxy.port)/test/pushed:v1")
        let (status, output) = try shell("skopeo", ["inspect", "--raw", "--tls-verify=false",
                                                    "docker://\(registry.address)/test/pushed:v1"])
        XCTAssertEqual(status, 0, output)
        for layer in image.layers { XCTAssertTrue(output.contains(layer)) }
        let head = try shell("curl", ["-sI", "\(proxy.base)/v2/test/pushed/manifests/v1",
                                      "-H", "Accept: application/vnd.oci.image.manifest.v1+json"]).output
        XCTAssertTrue(head.lowercased().contains("docker-content-digest: \(image.manifest)"), head)
        await proxy.stop()
        registry.stop()
    }

    func testCachedBlobHeadersRangesAndHead() async throws {
        let registry = try Registry()
        // One layer above the in-memory small-blob limit (sent with sendfile)
        // and one below it (sent from memory): both must answer alike.
        let image = try TestImage.make(layerSizes: [100_000, 3000])
        try image.push(to: "\(registry.address)/test/r:v1")
        let proxy = try await proxyFor(registry)
        for (layer, size) in zip(image.layers, [100_000, 3000]) {
            let url = "\(proxy.base)/v2/test/r/blobs/\(layer)"
            let first = try curl(url)  // fills the cache
            XCTAssertEqual(first.code, 200)
            let full = try curl(url).body
            XCTAssertEqual(full, first.body)
            XCTAssertEqual(full.count, size)

            let head = try shell("curl", ["-sI", url]).output.lowercased()
            XCTAssertTrue(head.hasPrefix("http/1.1 200"), head)
            for expected in ["content-length: \(size)", "docker-content-digest: \(layer)", "etag: \"\(layer)\"",
                             "accept-ranges: bytes"] {
                XCTAssertTrue(head.contains(expected), "\(expected) in \(head)")
            }
            let last = size - 1
            for (range, slice, contentRange) in [("0-9", 0..<10, "0-9/\(size)"), ("\(size - 10)-", (size - 10)..<size, "\(size - 10)-\(last)/\(size)"),
                                                 ("-5", (size - 5)..<size, "\(size - 5)-\(last)/\(size)"),
                                                 ("100-199", 100..<200, "100-199/\(size)")] {
                let r = try shell("curl", ["-s", "-D", "-", "-o", "/dev/null", "-H", "Range: bytes=\(range)", url]).output
                XCTAssertTrue(r.hasPrefix("HTTP/1.1 206"), r)
                XCTAssertTrue(r.lowercased().contains("content-range: bytes \(contentRange)"), r)
                let body = try curl(url, ["-H", "Range: bytes=\(range)"]).body
                XCTAssertEqual(body, full.subdata(in: slice), "\(range) of \(size)")
            }
            let unsatisfiable = try shell("curl", ["-s", "-D", "-", "-H", "Range: bytes=\(size)-", url]).output
            XCTAssertTrue(unsatisfiable.hasPrefix("HTTP/1.1 416"), unsatisfiable)
            XCTAssertTrue(unsatisfiable.lowercased().contains("content-range: bytes */\(size)"))
        }
        await proxy.stop()
        registry.stop()
    }

    func testTokenChallengeAndUnknownHostAndMetricsLint() async throws {
        let registry = try Registry()
        let proxy = try await proxyFor(registry)
        let ping = try shell("curl", ["-si", "\(proxy.base)/v2/"]).output
        XCTAssertTrue(ping.hasPrefix("HTTP/1.1 200"), ping)
        XCTAssertTrue(ping.lowercased().contains("docker-distribution-api-version: registry/2.0"))
        let unknown = try curl("\(proxy.base)/v2/", ["-H", "Host: nobody.example"])
        XCTAssertEqual(unknown.code, 404)
        XCTAssertTrue(String(decoding: unknown.body, as: UTF8.self).contains(#""code":"NAME_UNKNOWN""#))
        let missing = try curl("\(proxy.base)/v2/test/none/manifests/latest")
        XCTAssertEqual(missing.code, 404, "the upstream's own answer")

        let metricsFile = try makeTemporaryFolder("metrics") + "/metrics.txt"
        try curl(proxy.base + "/metrics").body.write(to: URL(fileURLWithPath: metricsFile))
        let (status, output) = try shell("sh", ["-c", "promtool check metrics < \(metricsFile)"])
        XCTAssertEqual(status, 0, output)
        let text = try String(contentsOfFile: metricsFile, encoding: .utf8)
        for name in ["cacheproxy_requests_total", "cacheproxy_upstream_requests_total", "cacheproxy_blob_hits_total",
                     "cacheproxy_blob_misses_total", "cacheproxy_blob_coalesced_total", "cacheproxy_served_bytes_total",
                     "cacheproxy_digest_mismatches_total", "cacheproxy_fills_in_flight", "cacheproxy_io_backend",
                     "process_cpu_seconds_total", "process_resident_memory_bytes"] {
            XCTAssertTrue(text.contains("# TYPE \(name) "), name)
        }
        await proxy.stop()
        registry.stop()
    }
}
