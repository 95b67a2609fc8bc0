import ArgumentParser
import AsyncHTTPClient
import CacheProxy
import Foundation
import Logging
import NIOSSL
import UnixSignals
#if canImport(Glibc)
import Glibc
#endif

/// `cache-proxy preload --config PATH [--platform OS/ARCH[/VARIANT]]...
/// [--all-platforms] [--file LIST] [--jobs N] IMAGE...`: loads images into
/// the cache folder, for air gaps and for warming a cache before a rollout.
struct PreloadCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "preload",
        abstract: "Load images into the cache (through a running server on the folder, or one of its own).",
        discussion: """
            An image is HOST/REPO:TAG or HOST/REPO@DIGEST, HOST a configured upstream host, registry \
            or alias (docker.io/library/alpine:3.20). What is loaded is served offline to the clients \
            it would be served to online. A rerun fetches only what is missing.
            """)

    @Option(help: "Path of the YAML configuration file.")
    var config: String = "./config.yaml"

    @Option(name: .customLong("platform"), help: "OS/ARCH[/VARIANT] to load from an index (repeatable; default: this machine's).")
    var platforms: [String] = []

    @Flag(name: .customLong("all-platforms"), help: "Load every platform of an index.")
    var allPlatforms = false

    @Option(help: "A file with one image a line (# starts a comment).")
    var file: String?

    @Option(help: "Images loaded at once.")
    var jobs: Int = 2

    @Argument(help: "Images to load.")
    var images: [String] = []

    func run() async throws {
        let settings: ProxyConfig
        var references: [ImageReference] = []
        var platforms: [Platform] = []
        do {
            settings = try ConfigLoader.load(path: config)
            guard (1...64).contains(jobs) else { throw ConfigError(key: "--jobs", problem: "\(jobs) is out of range 1-64") }
            for text in self.platforms {
                guard let platform = Platform(parsing: text) else {
                    throw ConfigError(key: "--platform", problem: "\(text) is not OS/ARCH[/VARIANT]")
                }
                platforms.append(platform)
            }
            var names = images
            if let file {
                guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                    throw ConfigError(key: "--file", problem: "\(file) cannot be read")
                }
                names += text.split(whereSeparator: \.isNewline)
                    .map { $0.prefix { $0 != "#" }.trimmingCharacters(in: .whitespaces) }
                    .filter { !$0.isEmpty }
            }
            guard !names.isEmpty else { throw ConfigError(key: "IMAGE", problem: "no image to preload") }
            for name in names {
                do {
                    references.append(try ImageReference(parsing: name, upstreams: settings.upstreams))
                } catch {
                    throw ConfigError(key: "IMAGE", problem: error.description)
                }
            }
        } catch let error as ConfigError {
            printError(error.description)
            throw ExitCode(2)
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = .warning
            return handler
        }
        let logger = Logger(label: "cache-proxy-preload")
        let endpoint: PreloadEndpoint
        do {
            endpoint = try await PreloadEndpoint.open(config: settings, logger: logger)
        } catch {
            printError("cache-proxy preload: cannot start: \(error)")
            throw ExitCode(1)
        }
        var configuration = HTTPClient.Configuration()
        configuration.timeout.read = .seconds(Int64(max(30, settings.timeouts.upstreamIdleSeconds * 2)))
        if endpoint.base.hasPrefix("https:") {
            // The running server on this machine, whose certificate names
            // the host clients use, not the loopback address used here.
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateVerification = .none
            configuration.tlsConfiguration = tls
        }
        let http = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
        let progress = PreloadProgress()
        let started = ContinuousClock.now
        let preloader = Preloader(http: http, base: endpoint.base, storage: settings.storage.folder,
                                  options: .init(platforms: platforms, allPlatforms: allPlatforms, jobs: jobs),
                                  progress: progress)
        // SIGINT/SIGTERM stop the preload: its requests are cancelled, and
        // its own server (if it started one) stops as on any shutdown,
        // saving what was loaded so far to the offline memory.
        let work = Task { await preloader.run(references) }
        let signals = await UnixSignalsSequence(trapping: .sigterm, .sigint)
        let watcher = Task {
            var seen = 0
            for await _ in signals {
                seen += 1
                // The first stops the work; a second one exits at once
                // (published blobs are whole by construction).
                if seen == 1 { work.cancel() } else { _exit(130) }
            }
        }
        let outcomes = await work.value
        watcher.cancel()
        try? await http.shutdown()
        await endpoint.stop()
        progress.summary(outcomes, seconds: started.duration(to: .now).inSeconds)
        if outcomes.contains(where: { $0.failure != nil }) { throw ExitCode(1) }
    }
}
