import CacheProxy
import Foundation
import Logging
import NIOCore
import ServiceLifecycle

/// The proxy, run in-process on a free port, with a graceful stop.
final class TestProxy: @unchecked Sendable {
    let server: ProxyServer
    let group: ServiceGroup
    let task: Task<Void, Error>
    let port: Int
    /// The TLS listener's port when it runs beside the plaintext one.
    let tlsPort: Int?
    let folder: String

    /// `upstreams` are YAML list items; the storage folder is new and empty
    /// unless one is given.
    init(upstreamsYAML: String, folder: String? = nil, extraYAML: String = "", fsync: Bool = false,
         apiYAML: String = "", storageYAML: String = "", resolver: any HostResolver = SystemResolver(),
         eventLoops: (any EventLoopGroup)? = nil) async throws {
        let folder = try folder ?? makeTemporaryFolder("cache")
        self.folder = folder
        let yaml = """
            api: {hostname: "127.0.0.1", port: 1\(apiYAML)}
            upstreams:
            \(upstreamsYAML)
            storage: {folder: "\(folder)", fsync: \(fsync), io_backend: \(TestBackend.yaml)\(storageYAML)}
            \(extraYAML)
            """
        var config = try ConfigLoader.parse(yaml: yaml)
        config.api.port = 0
        // No request lines in the test output unless a test asks for them.
        if !yaml.contains("log_level") { config.logLevel = "warning" }
        if config.api.tlsPort != nil { config.api.tlsPort = 0 }
        var logger = Logger(label: "test-proxy")
        logger.logLevel = .error
        if let eventLoops {
            server = try ProxyServer(config: config, logger: logger, group: eventLoops, resolver: resolver)
        } else {
            server = try ProxyServer(config: config, logger: logger, resolver: resolver)
        }
        group = ServiceGroup(services: [server], logger: logger)
        let group = self.group
        task = Task { try await group.run() }
        let ports = await server.boundPorts()
        guard let port = ports.first else { throw TestError("proxy did not bind") }
        self.port = port
        self.tlsPort = ports.count > 1 ? ports[1] : nil
    }

    var base: String { "http://127.0.0.1:\(port)" }

    func stop() async {
        await group.triggerGracefulShutdown()
        _ = try? await task.value
    }

    /// Files under `blobs/` and `tmp/`.
    func files(in sub: String) -> [String] {
        let root = folder + "/" + sub
        guard let e = FileManager.default.enumerator(atPath: root) else { return [] }
        return e.compactMap { item -> String? in
            guard let path = item as? String else { return nil }
            var isDir: ObjCBool = false
            FileManager.default.fileExists(atPath: root + "/" + path, isDirectory: &isDir)
            return isDir.boolValue ? nil : path
        }
    }

    /// The value of one series, named as the exposition writes it
    /// (`cacheproxy_blob_hits_total`, `x_total{source="cache"}`); 0 if absent.
    func metric(_ series: String) throws -> Double {
        let (_, text) = try shell("curl", ["-s", base + "/metrics"])
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.split(separator: " ").last ?? "") ?? 0
        }
        return 0
    }
}
