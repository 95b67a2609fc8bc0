import ArgumentParser
import Foundation
import CacheProxy
import Logging
import ServiceLifecycle
import UnixSignals
#if canImport(Glibc)
import Glibc
#endif

/// `cache-proxy [serve] --config PATH [--port N] [--storage DIR]`, and
/// `cache-proxy preload ...` (`PreloadCommand`).
@main
struct CacheProxyCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache-proxy",
        abstract: "A pull-through layer cache for OCI/Docker registries.",
        subcommands: [ServeCommand.self, PreloadCommand.self, VerifyCommand.self],
        defaultSubcommand: ServeCommand.self)
}

/// Runs the proxy until SIGTERM/SIGINT (the default subcommand).
struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the registries of the configuration (the default).")

    @Option(help: "Path of the YAML configuration file.")
    var config: String = "./config.yaml"

    @Option(help: "Listen on this port instead of api.port.")
    var port: Int?

    @Option(help: "Keep the cache in this folder instead of storage.folder.")
    var storage: String?

    @Option(name: .customLong("log-format"), help: "text or json; overrides log_format.")
    var logFormat: String?

    @Option(name: .customLong("io-backend"),
            help: "Storage backend: auto (io_uring when available), io_uring or threadpool; overrides storage.io_backend.")
    var ioBackend: String?

    func run() async throws {
        let settings: ProxyConfig
        do {
            settings = try loadSettings()
        } catch let error as ConfigError {
            printError(error.description)
            throw ExitCode(2)
        }
        // Every logger reads the level in force, so a reload changes it for
        // all of them at once.
        let liveLevel = LogLevelSetting(settings.logLevel)
        let format = settings.logFormat
        LoggingSystem.bootstrap { label in
            let inner: any LogHandler = format == .json
                ? JSONLogHandler(label: label, level: .trace) : StreamLogHandler.standardError(label: label)
            return LiveLevelLogHandler(wrapping: inner, level: liveLevel)
        }
        let logger = Logger(label: "cache-proxy")
        let server: ProxyServer
        do {
            server = try ProxyServer(config: settings, logger: logger, logLevel: liveLevel)
        } catch {
            printError("cache-proxy: cannot start: \(error)")
            throw ExitCode(1)
        }
        try await serve(server, settings: settings, logger: logger)
    }

    /// The file, with the command line's overrides: at start and at each
    /// reload alike.
    func loadSettings() throws -> ProxyConfig {
        var settings = try ConfigLoader.load(path: config)
        if let port {
            guard (1...65535).contains(port) else { throw ConfigError(key: "--port", problem: "\(port) is out of range 1-65535") }
            settings.api.port = port
        }
        if let storage { settings.storage.folder = storage }
        if let logFormat {
            settings.logFormat = try LogFormat(parsing: logFormat, key: "--log-format")
        }
        if let ioBackend {
            settings.storage.ioBackend = try ProxyConfig.IOBackendChoice(parsing: ioBackend, key: "--io-backend")
        }
        return settings
    }

    private func serve(_ server: ProxyServer, settings: ProxyConfig, logger: Logger) async throws {
        // The first SIGTERM/SIGINT drains, bounded by `timeouts.shutdown`
        // (the server's own deadline: it closes what is left and cancels
        // unfinished fills). Should something still not end (an fsync stuck
        // on a dying disk), the process exits anyway shortly after. A second
        // signal exits at once. Either way `blobs/` only ever received
        // complete, verified files by rename, and unfinished temporary files
        // are deleted first. `_exit`, not `exit`: no atexit handlers or
        // static destructors while NIO's threads still run.
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: logger))
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let grace = Duration.milliseconds(Int64(settings.timeouts.shutdownSeconds * 1000)) + .seconds(2)
        let watcher = Task {
            var seen = 0
            for await signal in signals {
                seen += 1
                if seen == 1 {
                    logger.info("signal received: draining", metadata: ["signal": "\(signal)"])
                    await group.triggerGracefulShutdown()
                    Task {
                        try await Task.sleep(for: grace)
                        logger.error("the drain did not end in time: exiting")
                        server.removeUnfinishedFiles()
                        _exit(1)
                    }
                } else {
                    logger.warning("second signal: exiting now", metadata: ["signal": "\(signal)"])
                    server.removeUnfinishedFiles()
                    _exit(1)
                }
            }
        }
        // SIGHUP: the configuration file is read again and put in force
        // (`ProxyServer.reload`), the listener's certificate and key too;
        // connections and transfers under way are not touched.
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        let reloader: Task<Void, Never>? = Task {
            for await _ in hangups {
                logger.info("SIGHUP: reloading the configuration", metadata: ["path": "\(config)"])
                server.reload { try loadSettings() }
            }
        }
        defer {
            watcher.cancel()
            reloader?.cancel()
        }
        try await group.run()
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data((message + "\n").utf8))
}

