import ArgumentParser
import Foundation
import CacheProxy
import Logging
import ServiceLifecycle

/// `cache-proxy --config PATH [--port N] [--storage DIR]`
@main
struct CacheProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache-proxy",
        abstract: "A pull-through layer cache for OCI/Docker registries.")

    @Option(help: "Path of the YAML configuration file.")
    var config: String = "./config.yaml"

    @Option(help: "Listen on this port instead of api.port.")
    var port: Int?

    @Option(help: "Keep the cache in this folder instead of storage.folder.")
    var storage: String?

    func run() async throws {
        var settings: ProxyConfig
        do {
            settings = try ConfigLoader.load(path: config)
            if let port {
                guard (1...65535).contains(port) else { throw ConfigError(key: "--port", problem: "\(port) is out of range 1-65535") }
                settings.api.port = port
            }
            if let storage { settings.storage.folder = storage }
        } catch let error as ConfigError {
            printError(error.description)
            throw ExitCode(2)
        }
        let level = Logger.Level(rawValue: settings.logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "cache-proxy")
        let server: ProxyServer
        do {
            server = try ProxyServer(config: settings, logger: logger)
        } catch {
            printError("cache-proxy: cannot start: \(error)")
            throw ExitCode(1)
        }
        let group = ServiceGroup(configuration: .init(
            services: [.init(service: server)],
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger))
        try await group.run()
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data((message + "\n").utf8))
}

