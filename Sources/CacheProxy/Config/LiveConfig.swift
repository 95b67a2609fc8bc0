import Logging
import NIOConcurrencyHelpers

/// The configuration in force now, replaced whole by a reload (SIGHUP).
///
/// Each request reads it once at its start (the router above all) and keeps
/// what it read to its end: a request, or a download, that began before a
/// reload finishes under the configuration it began with, even through an
/// upstream the reload removed. New connections take the new timeouts and
/// limits; open ones keep theirs.
public final class LiveConfig: Sendable {
    struct Current: Sendable {
        var config: ProxyConfig
        var router: Router
    }

    private let current: NIOLockedValueBox<Current>

    init(_ config: ProxyConfig) {
        current = NIOLockedValueBox(Current(config: config, router: Router(upstreams: config.upstreams)))
    }

    public var config: ProxyConfig { current.withLockedValue { $0.config } }
    /// One value of the configuration, read without copying the rest (a
    /// copy retains every string and list in it: on every pull by tag,
    /// that was ~100 instructions for one number). `value` runs under the
    /// configuration's lock: it must not read the live configuration again.
    func read<T>(_ value: (ProxyConfig) -> T) -> T { current.withLockedValue { value($0.config) } }
    var router: Router { current.withLockedValue { $0.router } }

    func replace(with config: ProxyConfig) {
        let router = Router(upstreams: config.upstreams)
        current.withLockedValue { $0 = Current(config: config, router: router) }
    }

    /// The keys a running process cannot change (listeners, the storage
    /// folder and its backend, the log format, the connect timeout of the
    /// upstream clients): `new` with their running values, and their names.
    static func keepingRestartOnly(_ new: ProxyConfig, running old: ProxyConfig) -> (ProxyConfig, [String]) {
        var kept = new
        var named: [String] = []
        func keep<T: Equatable>(_ key: String, _ path: WritableKeyPath<ProxyConfig, T>) {
            guard new[keyPath: path] != old[keyPath: path] else { return }
            kept[keyPath: path] = old[keyPath: path]
            named.append(key)
        }
        keep("api.hostname", \.api.hostname)
        keep("api.port", \.api.port)
        keep("api.tls_port", \.api.tlsPort)
        keep("api.tls_cert", \.api.tlsCert)
        keep("api.tls_key", \.api.tlsKey)
        keep("storage.folder", \.storage.folder)
        keep("storage.io_backend", \.storage.ioBackend)
        keep("storage.fsync", \.storage.fsync)
        keep("storage.max_size", \.storage.maxSize)
        keep("storage.high_watermark", \.storage.highWatermark)
        keep("storage.low_watermark", \.storage.lowWatermark)
        keep("api.trust_forwarded_headers", \.api.trustForwardedHeaders)
        keep("timeouts.connect", \.timeouts.connectSeconds)
        keep("timeouts.shutdown", \.timeouts.shutdownSeconds)
        keep("log_format", \.logFormat)
        return (kept, named)
    }
}

/// The log level in force, read by every log line and by the request log,
/// so a reload changes it for everything at once.
public final class LogLevelSetting: Sendable {
    private let level: NIOLockedValueBox<Logger.Level>

    /// `value` is a validated `log_level` (`ConfigLoader`).
    public init(_ value: String) {
        level = NIOLockedValueBox(Logger.Level(rawValue: value) ?? .info)
    }

    public var value: Logger.Level { level.withLockedValue { $0 } }
    public func set(_ value: String) { level.withLockedValue { $0 = Logger.Level(rawValue: value) ?? .info } }
    /// Whether lines at `info` are written: asked once per request.
    var showsInfo: Bool { value <= .info }
}
