import Foundation
import XCTest
@testable import CacheProxy

/// containerd (Debian's package, run as root by the test) fetching an image
/// with the proxy configured as its mirror in `hosts.toml`, exactly as
/// README.md tells operators to do it. The proxy's only upstream is reachable
/// through containerd's `?ns=` parameter alone (its `host` is a name nothing
/// uses), so this also shows `ns` routing.
final class ContainerdMirrorTests: XCTestCase {
    func testCtrContentFetchGoesThroughTheMirror() async throws {
        let registry = try Registry()
        let image = try TestImage.make(tag: "v1", layerSizes: [300_000, 5000])
        try image.push(to: "\(registry.address)/test/ctr:v1")
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"mirror-only.invalid\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}")

        let root = try makeTemporaryFolder("containerd")
        let socket = root + "/containerd.sock"
        try """
            version = 2
            root = "\(root)/root"
            state = "\(root)/state"
            disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                                "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                                "io.containerd.snapshotter.v1.aufs"]
            [grpc]
              address = "\(socket)"
            [ttrpc]
              address = "\(socket).ttrpc"
            """.write(toFile: root + "/config.toml", atomically: true, encoding: .utf8)
        // The hosts.toml of README.md, with this test's addresses.
        let hostsDir = root + "/certs.d"
        try FileManager.default.createDirectory(atPath: "\(hostsDir)/\(registry.address)", withIntermediateDirectories: true)
        try """
            server = "http://\(registry.address)"

            [host."http://127.0.0.1:\(proxy.port)"]
              capabilities = ["pull", "resolve"]
            """.write(toFile: "\(hostsDir)/\(registry.address)/hosts.toml", atomically: true, encoding: .utf8)

        let containerd = try Daemon("containerd", ["--config", root + "/config.toml"], logPath: root + "/containerd.log")
        defer { containerd.stop() }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: socket) { try await Task.sleep(for: .milliseconds(100)) }
        XCTAssertTrue(FileManager.default.fileExists(atPath: socket), containerd.log)

        let ctr = ["--address", socket, "--namespace", "cacheproxytest"]
        let (status, output) = try shell("ctr", ctr + ["content", "fetch", "--hosts-dir", hostsDir,
                                                       "\(registry.address)/test/ctr:v1"])
        XCTAssertEqual(status, 0, output)
        let listed = try shell("ctr", ctr + ["content", "ls", "-q"]).output
        for digest in image.layers + [image.config, image.manifest] {
            XCTAssertTrue(listed.contains(digest), "\(digest) not in containerd's content store")
        }
        // Every blob and the manifest came through the proxy (and are
        // cached there).
        let cached = Set(proxy.files(in: "blobs").map { "sha256:" + ($0.split(separator: "/").last ?? "") })
        XCTAssertEqual(cached, Set(image.layers + [image.config, image.manifest]))
        XCTAssertEqual(try proxy.metric("cacheproxy_blob_misses_total"), Double(image.layers.count + 1))
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_misses_total"), 1)

        // The registry goes away; containerd forgets the image and fetches
        // it again by tag: the proxy resolves the tag from its offline
        // table, and every byte comes from its cache.
        registry.stop()
        let removed = try shell("ctr", ctr + ["content", "rm"] + image.layers + [image.config, image.manifest])
        XCTAssertEqual(removed.status, 0, removed.output)
        XCTAssertFalse(try shell("ctr", ctr + ["content", "ls", "-q"]).output.contains(image.manifest))
        let (offlineStatus, offlineOutput) = try shell("ctr", ctr + ["content", "fetch", "--hosts-dir", hostsDir,
                                                                     "\(registry.address)/test/ctr:v1"])
        XCTAssertEqual(offlineStatus, 0, offlineOutput)
        let relisted = try shell("ctr", ctr + ["content", "ls", "-q"]).output
        for digest in image.layers + [image.config, image.manifest] {
            XCTAssertTrue(relisted.contains(digest), "\(digest) fetched while the registry is down")
        }
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 1)
        await proxy.stop()
    }
}
