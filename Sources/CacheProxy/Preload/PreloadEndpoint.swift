import Logging
import ServiceLifecycle

/// The proxy `cache-proxy preload` pulls through: the server running on the
/// cache folder when there is one (it holds the folder's lock; two
/// processes must not write one folder's index and memory), otherwise one
/// started here on a loopback port for the time of the preload, which
/// saves the offline memory when it stops.
public struct PreloadEndpoint: Sendable {
    /// `http(s)://host:port` of the proxy.
    public let base: String
    private let stopAction: @Sendable () async -> Void

    public func stop() async { await stopAction() }

    public static func open(config: ProxyConfig, logger: Logger) async throws -> PreloadEndpoint {
        var local = config
        local.api.hostname = "127.0.0.1"
        local.api.port = 0
        local.logLevel = "warning"  // no request lines among the progress bars
        (local.api.tlsCert, local.api.tlsKey, local.api.tlsPort) = (nil, nil, nil)
        let server: ProxyServer
        do {
            server = try ProxyServer(config: local, logger: logger)
        } catch StoreError.folderInUse {
            // A server runs on this folder: pulled through its listener
            // (TLS when it has no plaintext one).
            let tls = config.api.tlsCert != nil && config.api.tlsPort == nil
            var host = ["", "0.0.0.0", "::"].contains(config.api.hostname) ? "127.0.0.1" : config.api.hostname
            if host.contains(":") { host = "[\(host)]" }
            return PreloadEndpoint(base: "\(tls ? "https" : "http")://\(host):\(config.api.port)", stopAction: {})
        }
        let group = ServiceGroup(services: [server], logger: logger)
        let task = Task { try await group.run() }
        guard let port = await server.boundPort() else {
            await group.triggerGracefulShutdown()
            _ = try? await task.value
            throw Preloader.Failure(description: "the preload's own server did not start")
        }
        return PreloadEndpoint(base: "http://127.0.0.1:\(port)", stopAction: {
            await group.triggerGracefulShutdown()
            _ = try? await task.value
        })
    }
}
