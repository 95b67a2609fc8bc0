import Crypto
import Foundation
import XCTest
@testable import CacheProxy

/// `cache-proxy preload` (the binary) against the real distribution
/// registry: platforms, reruns, with and without a server on the folder,
/// the folder carried elsewhere, and its display on and off a terminal.
final class PreloadTests: XCTestCase {
    /// An OCI layout holding an index of two platforms, each with its own
    /// layers and config.
    struct MultiArchImage {
        let layout: String
        let tag: String
        let index: String
        /// Per architecture: its manifest and blobs (config and layers).
        let manifests: [String: String]
        let blobs: [String: [String]]

        static func make(tag: String = "v1") throws -> MultiArchImage {
            let layout = try makeTemporaryFolder("multi")
            try FileManager.default.createDirectory(atPath: layout + "/blobs/sha256", withIntermediateDirectories: true)
            func write(_ data: Data) throws -> (digest: String, size: Int) {
                let digest = TestImage.digest(data)
                try data.write(to: URL(fileURLWithPath: "\(layout)/blobs/sha256/\(digest.dropFirst(7))"))
                return (digest, data.count)
            }
            var manifests: [String: String] = [:]
            var blobs: [String: [String]] = [:]
            var entries: [String] = []
            for architecture in ["amd64", "arm64"] {
                let layers = try [3000, 40_000].map { size in
                    try write(Data((0..<size).map { _ in UInt8.random(in: 0...255) }))
                }
                let diffIDs = layers.map { "\"\($0.digest)\"" }.joined(separator: ",")
                let config = try write(Data(#"{"architecture":"\#(architecture)","os":"linux","rootfs":{"type":"layers","diff_ids":[\#(diffIDs)]}}"#.utf8))
                let layerJSON = layers.map {
                    #"{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"\#($0.digest)","size":\#($0.size)}"#
                }.joined(separator: ",")
                let manifest = try write(Data("""
                    {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",\
                    "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"\(config.digest)","size":\(config.size)},\
                    "layers":[\(layerJSON)]}
                    """.utf8))
                manifests[architecture] = manifest.digest
                blobs[architecture] = [config.digest] + layers.map(\.digest)
                entries.append(#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"\#(manifest.digest)","size":\#(manifest.size),"platform":{"architecture":"\#(architecture)","os":"linux"}}"#)
            }
            let index = try write(Data(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[\#(entries.joined(separator: ","))]}"#.utf8))
            try #"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"\#(index.digest)","size":\#(index.size),"annotations":{"org.opencontainers.image.ref.name":"\#(tag)"}}]}"#
                .write(toFile: layout + "/index.json", atomically: true, encoding: .utf8)
            try #"{"imageLayoutVersion":"1.0.0"}"#.write(toFile: layout + "/oci-layout", atomically: true, encoding: .utf8)
            return MultiArchImage(layout: layout, tag: tag, index: index.digest, manifests: manifests, blobs: blobs)
        }

        func push(to destination: String) throws {
            let (status, output) = try shell("skopeo", ["copy", "--all", "--dest-tls-verify=false", "--preserve-digests",
                                                        "oci:\(layout):\(tag)", "docker://\(destination)"])
            guard status == 0 else { throw TestError("skopeo push failed: \(output)") }
        }
    }

    func writeConfig(_ registry: Registry, folder: String, port: Int) throws -> String {
        let path = try makeTemporaryFolder("preload-config") + "/c.yaml"
        try """
            api: {hostname: "127.0.0.1", port: \(port)}
            upstreams:
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(registry.port), schema: "http"}
            storage: {folder: "\(folder)", fsync: false, io_backend: \(TestBackend.yaml)}
            timeouts: {connect: 1, upstream: 5}
            """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// skopeo's pull by tag through `proxy`, as an amd64 machine: the
    /// image manifest's digest, or skopeo's output when it failed.
    func pull(_ proxy: TestProxy, _ reference: String) throws -> String {
        let out = try makeTemporaryFolder("pull")
        let (status, output) = try shell("skopeo", ["--override-arch", "amd64", "--override-os", "linux", "copy",
                                                    "--src-tls-verify=false", "--preserve-digests",
                                                    "docker://127.0.0.1:\(proxy.port)/\(reference)", "dir:\(out)"])
        guard status == 0, let data = try? Data(contentsOf: URL(fileURLWithPath: out + "/manifest.json")) else {
            return output
        }
        return TestImage.digest(data)
    }

    func testImageNamesAreReadAsAPullReadsThem() throws {
        let hub = ProxyConfig.Upstream(host: "hub.mirror:5000", registry: "registry-1.docker.io", port: 443,
                                       schema: "https", aliases: [])
        let local = ProxyConfig.Upstream(host: "127.0.0.1", registry: "127.0.0.1", port: 5000, schema: "http",
                                         aliases: ["lab"])
        let upstreams = [hub, local]
        let alpine = try ImageReference(parsing: "docker.io/alpine:3.20", upstreams: upstreams)
        XCTAssertEqual(alpine.upstream.host, "hub.mirror:5000")
        XCTAssertEqual(alpine.repository, "library/alpine")
        XCTAssertEqual(alpine.reference, .tag("3.20"))
        let digest = "sha256:" + String(repeating: "c", count: 64)
        let pinned = try ImageReference(parsing: "lab/team/app:v1@\(digest)", upstreams: upstreams)
        XCTAssertEqual(pinned.upstream.host, "127.0.0.1")
        XCTAssertEqual(pinned.repository, "team/app")
        XCTAssertEqual(pinned.reference, .digest(try Digest(parsing: digest)))
        XCTAssertEqual(try ImageReference(parsing: "127.0.0.1/app", upstreams: upstreams).reference, .tag("latest"))
        for bad in ["alpine:3.20", "quay.io/a/b:1", "lab/Bad/Name:1", "lab/a@sha256:zz", "lab/a:-x"] {
            XCTAssertThrowsError(try ImageReference(parsing: bad, upstreams: upstreams), bad)
        }
        XCTAssertEqual(Platform(parsing: "linux/arm/v7"), Platform(os: "linux", architecture: "arm", variant: "v7"))
        XCTAssertNil(Platform(parsing: "linux"))
        XCTAssertTrue(Platform(os: "linux", architecture: "arm").matches(Platform(os: "linux", architecture: "arm", variant: "v6")))
        XCTAssertFalse(Platform(os: "linux", architecture: "arm", variant: "v7")
            .matches(Platform(os: "linux", architecture: "arm", variant: "v6")))
    }

    /// Behind a token service (as Docker Hub): the preload does the token
    /// dance for an anonymous pull of a public repository, as a client does.
    func testPreloadGetsAnAnonymousTokenLikeAClient() async throws {
        let tokens = try await TokenServer(users: ["": ("", ["public/app"]), "alice": ("a", ["public/app"])])
        let registry = try Registry(tokens: tokens)
        let image = try TestImage.make(layerSizes: [2000])
        try image.push(to: "\(registry.address)/public/app:v1", credentials: "alice:a")
        let folder = try makeTemporaryFolder("cache")
        let config = try writeConfig(registry, folder: folder, port: try freePort())
        let (status, output) = try shell(proxyBinary(), ["preload", "--config", config, "127.0.0.1/public/app:v1"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("ok 127.0.0.1/public/app:v1: 2 blobs (2 fetched"), output)
        let (denied, deniedOutput) = try shell(proxyBinary(), ["preload", "--config", config, "127.0.0.1/private/app:v1"])
        XCTAssertEqual(denied, 1, deniedOutput)
        XCTAssertTrue(deniedOutput.contains("401 from the upstream"), deniedOutput)
        registry.stop()
    }

    func testPreloadLoadsOnlyTheAskedPlatformAndTheFolderServesItOfflineEvenElsewhere() async throws {
        let registry = try Registry()
        let multi = try MultiArchImage.make()
        try multi.push(to: "\(registry.address)/test/multi:v1")
        let folder = try makeTemporaryFolder("cache")
        let config = try writeConfig(registry, folder: folder, port: try freePort())
        let image = "127.0.0.1/test/multi:v1"

        // No server on the folder: the preload runs its own. Not on a
        // terminal: one plain line per image, then the summary.
        let (status, output) = try shell(proxyBinary(), ["preload", "--config", config, "--platform", "linux/amd64", image])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("ok \(image): 3 blobs (3 fetched, 0 already cached)"), output)
        XCTAssertTrue(output.contains("preloaded 1 of 1 images: 3 blobs fetched, 0 already cached"), output)
        XCTAssertFalse(output.contains("\u{1B}["), "no terminal codes in a log: \(output)")
        try await Task.sleep(for: .milliseconds(1200))
        for blob in multi.blobs["amd64"] ?? [] { XCTAssertEqual(registry.blobGets(blob), 1, "amd64 \(blob)") }
        for blob in multi.blobs["arm64"] ?? [] { XCTAssertEqual(registry.blobGets(blob), 0, "arm64 \(blob)") }

        // A rerun on a terminal (`script`), with a list holding a comment
        // and an image that does not exist: only what is missing is asked
        // for, the failure is named, and the exit status says so.
        let list = folder + "-list"
        try "# images for the edge\n\(image)\n127.0.0.1/test/missing:v1  # not there\n"
            .write(toFile: list, atomically: true, encoding: .utf8)
        let command = "\(proxyBinary()) preload --config \(config) --platform linux/amd64 --file \(list)"
        let (rerunStatus, rerun) = try shell("script", ["-qec", command, "/dev/null"])
        XCTAssertNotEqual(rerunStatus, 0, rerun)
        XCTAssertTrue(rerun.contains("\u{1B}[2K"), "redrawn in place on a terminal: \(rerun)")
        XCTAssertTrue(rerun.contains("] 100%  3/3 blobs"), "a bar with bytes and blobs: \(rerun)")
        XCTAssertTrue(rerun.contains("ok \(image): 3 blobs (0 fetched, 3 already cached)"), rerun)
        XCTAssertTrue(rerun.contains("FAILED 127.0.0.1/test/missing:v1"), rerun)
        XCTAssertTrue(rerun.contains("failed: 127.0.0.1/test/missing:v1"), rerun)
        try await Task.sleep(for: .milliseconds(1200))
        for blob in multi.blobs["amd64"] ?? [] { XCTAssertEqual(registry.blobGets(blob), 1, "not fetched again") }

        // With a server running on the folder, the preload goes through it.
        let single = try TestImage.make(layerSizes: [5000])
        try single.push(to: "\(registry.address)/test/single:v1")
        let server = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}",
                                         folder: folder, extraYAML: "timeouts: {connect: 1, upstream: 5}")
        let throughServer = try writeConfig(registry, folder: folder, port: server.port)
        let (serverStatus, serverOutput) = try shell(proxyBinary(), ["preload", "--config", throughServer,
                                                                     "127.0.0.1/test/single:v1"])
        XCTAssertEqual(serverStatus, 0, serverOutput)
        XCTAssertEqual(try server.metric("cacheproxy_blob_misses_total"), 2, "the running server fetched them")
        await server.stop()

        // The registry goes away; a server on the folder serves both by tag.
        registry.stop()
        let offline = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}",
                                          folder: folder, extraYAML: "timeouts: {connect: 1, upstream: 3}")
        XCTAssertEqual(try pull(offline, "test/multi:v1"), multi.manifests["amd64"])
        XCTAssertEqual(try pull(offline, "test/single:v1"), single.manifest)
        await offline.stop()

        // The folder carried to another machine with tar (no extended
        // attributes): it serves there too.
        let copy = try makeTemporaryFolder("copied")
        let (tarStatus, tarOutput) = try shell("sh", ["-c", "tar -C \(folder) -cf - . | tar -C \(copy) -xf -"])
        XCTAssertEqual(tarStatus, 0, tarOutput)
        let elsewhere = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"}",
                                            folder: copy, extraYAML: "timeouts: {connect: 1, upstream: 3}")
        XCTAssertEqual(try pull(elsewhere, "test/multi:v1"), multi.manifests["amd64"])
        await elsewhere.stop()
    }
}
