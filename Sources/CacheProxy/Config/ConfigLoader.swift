import Foundation
import Yams

/// A configuration problem, always naming the key it is about, so that a bad
/// file stops the start with one line an operator can act on.
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public let key: String
    public let problem: String
    public var description: String { "config: \(key): \(problem)" }

    public init(key: String, problem: String) {
        self.key = key
        self.problem = problem
    }
}

/// Reads `config.yaml`: a superset of the reference design's file, so an
/// existing one works unchanged. Validation is written out by hand rather than
/// through `Decodable` because `Decodable`'s errors do not name keys in a form
/// an operator can read, and unknown keys must be refused.
public enum ConfigLoader {
    public static func load(path: String) throws -> ProxyConfig {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigError(key: path, problem: "cannot read the file (\(error.localizedDescription))")
        }
        return try parse(yaml: text)
    }

    public static func parse(yaml text: String) throws -> ProxyConfig {
        let root: Any?
        do {
            root = try Yams.load(yaml: text)
        } catch {
            throw ConfigError(key: "(file)", problem: "not valid YAML: \(error)")
        }
        let top = try Node(value: root ?? [String: Any](), key: "(top level)").mapping(
            allowed: ["api", "upstreams", "storage", "timeouts", "limits", "log_level", "log_format"])

        let apiConfig = try Self.api(try top.required("api"))

        let upstreamNodes = try top.required("upstreams").sequence()
        if upstreamNodes.isEmpty {
            throw ConfigError(key: "upstreams", problem: "at least one upstream is needed")
        }
        var seenHosts = Set<String>()
        let upstreams = try upstreamNodes.map { node -> ProxyConfig.Upstream in
            let u = try node.mapping(allowed: Self.upstreamKeys)
            let schema = try u.optional("schema")?.string() ?? "https"
            guard schema == "http" || schema == "https" else {
                throw ConfigError(key: "\(node.key).schema", problem: "must be \"http\" or \"https\", not \"\(schema)\"")
            }
            let hostNode = try u.required("host")
            let host = try hostNode.string().lowercased()
            guard !host.isEmpty, !host.contains("/"), !host.contains(" ") else {
                throw ConfigError(key: hostNode.key, problem: "must be a host name, optionally with :port")
            }
            guard seenHosts.insert(host).inserted else {
                throw ConfigError(key: hostNode.key, problem: "\"\(host)\" is already used by another upstream")
            }
            let registryNode = try u.required("registry")
            let registry = try registryNode.string().lowercased()
            guard !registry.isEmpty, !registry.contains("/"), !registry.contains(" ") else {
                throw ConfigError(key: registryNode.key, problem: "must be a host name without scheme or path")
            }
            // The TLS settings, the token realm rule and the redirect rule
            // all compare the registry's host name; a port written into it
            // would silently make them not apply.
            let bracketed = registry.hasPrefix("[") && registry.hasSuffix("]")
            guard !registry.contains(":") || bracketed else {
                throw ConfigError(key: registryNode.key, problem:
                    "must be a host name without a port (give the port as \(node.key).port; an IPv6 address goes in brackets)")
            }
            let aliases = try u.optional("aliases")?.sequence().map { try $0.string().lowercased() } ?? []
            var upstream = ProxyConfig.Upstream(
                host: host, registry: registry,
                port: try u.optional("port")?.port() ?? (schema == "https" ? 443 : 80),
                schema: schema, aliases: aliases)
            upstream.maxFills = try u.optional("max_fills")?.integer(in: 1...4096) ?? upstream.maxFills
            if let node = u.optional("manifests") {
                guard let value = ProxyConfig.Manifests(rawValue: try node.string()) else {
                    throw ConfigError(key: node.key, problem: "must be revalidate or passthrough")
                }
                upstream.manifests = value
            }
            try Self.security(u, into: &upstream)
            return upstream
        }

        let storageConfig = try Self.storage(try top.required("storage"))

        let timeoutKeys: [(String, WritableKeyPath<ProxyConfig.Timeouts, Double>)] = [
            ("connect", \.connectSeconds), ("upstream", \.upstreamSeconds), ("upstream_idle", \.upstreamIdleSeconds),
            ("header_read", \.headerReadSeconds), ("idle", \.idleSeconds), ("request_body", \.requestBodySeconds),
            ("send", \.sendSeconds), ("shutdown", \.shutdownSeconds),
        ]
        let timeoutsNode = try top.optional("timeouts")?.mapping(allowed: Set(timeoutKeys.map(\.0)))
        var timeouts = ProxyConfig.Timeouts()
        for (name, path) in timeoutKeys {
            if let value = try timeoutsNode?.optional(name)?.seconds() { timeouts[keyPath: path] = value }
        }
        let limits = try top.optional("limits")?.mapping(allowed: ["max_header_bytes"])
        let logLevel = try top.optional("log_level")?.string() ?? "info"
        let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
        guard levels.contains(logLevel) else {
            throw ConfigError(key: "log_level", problem: "must be one of \(levels.joined(separator: ", "))")
        }

        var config = ProxyConfig(
            api: apiConfig,
            upstreams: upstreams,
            storage: storageConfig,
            timeouts: timeouts,
            maxHeaderBytes: try limits?.optional("max_header_bytes")?.integer(in: 1024...1_048_576) ?? 65536,
            logLevel: logLevel)
        if let node = top.optional("log_format") {
            config.logFormat = try LogFormat(parsing: try node.string(), key: node.key)
        }
        return config
    }
}

extension ConfigLoader {
    static func api(_ node: Node) throws -> ProxyConfig.API {
        let api = try node.mapping(allowed: ["hostname", "port", "tls_cert", "tls_key", "tls_port",
                                             "trust_forwarded_headers"])
        var config = ProxyConfig.API(
            hostname: try api.optional("hostname")?.string() ?? "0.0.0.0",
            port: try api.optional("port")?.port() ?? 5000,
            trustForwardedHeaders: try api.optional("trust_forwarded_headers")?.bool() ?? false)
        config.tlsCert = try api.optional("tls_cert")?.readableFile()
        config.tlsKey = try api.optional("tls_key")?.readableFile()
        config.tlsPort = try api.optional("tls_port")?.port()
        if (config.tlsCert == nil) != (config.tlsKey == nil) {
            throw ConfigError(key: config.tlsCert == nil ? "api.tls_cert" : "api.tls_key",
                              problem: "tls_cert and tls_key go together")
        }
        if config.tlsPort != nil, config.tlsCert == nil {
            throw ConfigError(key: "api.tls_port", problem: "needs api.tls_cert and api.tls_key")
        }
        if let tlsPort = config.tlsPort, tlsPort == config.port {
            throw ConfigError(key: "api.tls_port", problem: "must differ from api.port (\(config.port))")
        }
        return config
    }

    static let upstreamKeys: Set<String> = [
        "host", "registry", "port", "schema", "aliases", "access_check", "access_cache_ttl", "offline",
        "username", "password", "password_file", "password_env", "ca_file", "client_cert", "client_key", "insecure",
        "max_fills", "manifests",
    ]

    /// The keys of an upstream that decide who gets what: access checks,
    /// the proxy's own credentials, TLS.
    static func security(_ u: Mapping, into upstream: inout ProxyConfig.Upstream) throws {
        if let node = u.optional("access_check") {
            guard let value = ProxyConfig.AccessCheck(rawValue: try node.string()) else {
                throw ConfigError(key: node.key, problem: "must be always or never")
            }
            upstream.accessCheck = value
        }
        if let ttl = try u.optional("access_cache_ttl")?.seconds() { upstream.accessCacheTTL = ttl }
        if let node = u.optional("offline") {
            guard let value = ProxyConfig.Offline(rawValue: try node.string()) else {
                throw ConfigError(key: node.key, problem: "must be serve or deny")
            }
            upstream.offline = value
        }
        let secrets = ["password", "password_file", "password_env"].compactMap { u.optional($0) }
        if let username = u.optional("username") {
            guard secrets.count == 1 else {
                throw ConfigError(key: username.key, problem: "needs exactly one of password, password_file, password_env")
            }
            let name = try username.string()
            guard !name.isEmpty, !name.contains(":") else {
                throw ConfigError(key: username.key, problem: "must be non-empty and without \":\"")
            }
            upstream.credentials = .init(username: name, password: try Self.password(secrets[0]))
        } else if let secret = secrets.first {
            throw ConfigError(key: secret.key, problem: "needs a username beside it")
        }
        upstream.tls.caFile = try u.optional("ca_file")?.readableFile()
        upstream.tls.clientCert = try u.optional("client_cert")?.readableFile()
        upstream.tls.clientKey = try u.optional("client_key")?.readableFile()
        upstream.tls.insecure = try u.optional("insecure")?.bool() ?? false
        if (upstream.tls.clientCert == nil) != (upstream.tls.clientKey == nil) {
            let missing = upstream.tls.clientCert == nil ? "client_cert" : "client_key"
            throw ConfigError(key: u.key + "." + missing, problem: "client_cert and client_key go together")
        }
    }

    /// A password from the file itself, a file (its first line), or the
    /// environment. Errors name the key and never the value.
    static func password(_ node: Node) throws -> String {
        let name = node.key.split(separator: ".").last.map(String.init) ?? node.key
        let value: String
        switch name {
        case "password_file":
            let path = try node.readableFile()
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw ConfigError(key: node.key, problem: "cannot read \(path)")
            }
            value = String(text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "")
                .trimmingCharacters(in: CharacterSet(charactersIn: "\r"))
        case "password_env":
            let variable = try node.string()
            guard let text = ProcessInfo.processInfo.environment[variable] else {
                throw ConfigError(key: node.key, problem: "the environment variable \(variable) is not set")
            }
            value = text
        default:
            value = try node.string()
        }
        guard !value.isEmpty else { throw ConfigError(key: node.key, problem: "the password is empty") }
        return value
    }

    static func storage(_ node: Node) throws -> ProxyConfig.Storage {
        let storage = try node.mapping(allowed: ["folder", "fsync", "io_backend", "max_size", "high_watermark",
                                                 "low_watermark"])
        let folderNode = try storage.required("folder")
        let folder = try folderNode.string()
        if folder.isEmpty { throw ConfigError(key: folderNode.key, problem: "must not be empty") }
        var config = ProxyConfig.Storage(folder: folder, fsync: try storage.optional("fsync")?.bool() ?? true)
        if let backend = storage.optional("io_backend") {
            config.ioBackend = try ProxyConfig.IOBackendChoice(parsing: try backend.string(), key: backend.key)
        }
        config.maxSize = try storage.optional("max_size")?.byteSize()
        if let high = try storage.optional("high_watermark")?.fraction() { config.highWatermark = high }
        if let low = try storage.optional("low_watermark")?.fraction() { config.lowWatermark = low }
        guard config.lowWatermark < config.highWatermark else {
            throw ConfigError(key: storage.optional("low_watermark")?.key ?? "storage.low_watermark",
                              problem: "must be below storage.high_watermark (\(config.highWatermark))")
        }
        return config
    }
}

/// A YAML value together with the dotted key it was found at.
struct Node {
    let value: Any
    let key: String

    func mapping(allowed: Set<String>) throws -> Mapping {
        guard let dict = value as? [String: Any] else {
            if let any = value as? [AnyHashable: Any], any.keys.contains(where: { !($0 is String) }) {
                throw ConfigError(key: key, problem: "keys must be strings")
            }
            throw ConfigError(key: key, problem: "expected a mapping")
        }
        for name in dict.keys.sorted() where !allowed.contains(name) {
            // An empty key (`? ` or `"":` in YAML) is named as written, so
            // the message still points somewhere (found by fuzzing).
            throw ConfigError(key: join(name.isEmpty ? "\"\"" : name), problem: "unknown key (allowed: \(allowed.sorted().joined(separator: ", ")))")
        }
        return Mapping(values: dict, key: key == "(top level)" ? "" : key)
    }

    func sequence() throws -> [Node] {
        guard let items = value as? [Any] else { throw ConfigError(key: key, problem: "expected a list") }
        return items.enumerated().map { Node(value: $0.element, key: "\(key)[\($0.offset)]") }
    }

    func string() throws -> String {
        if let s = value as? String { return s }
        throw ConfigError(key: key, problem: "expected a string")
    }

    func bool() throws -> Bool {
        if let b = value as? Bool { return b }
        throw ConfigError(key: key, problem: "expected true or false")
    }

    /// An integer, written as a YAML number or as a string of digits (the
    /// reference design writes `port: "5000"`).
    func integer(in range: ClosedRange<Int>) throws -> Int {
        let number: Int?
        if let i = value as? Int { number = i }
        else if let s = value as? String { number = Int(s.trimmingCharacters(in: .whitespaces)) }
        else { number = nil }
        guard let n = number else { throw ConfigError(key: key, problem: "expected a whole number") }
        guard range.contains(n) else {
            throw ConfigError(key: key, problem: "\(n) is out of range \(range.lowerBound)-\(range.upperBound)")
        }
        return n
    }

    func port() throws -> Int { try integer(in: 1...65535) }

    func seconds() throws -> Double {
        let number: Double?
        if let i = value as? Int { number = Double(i) }
        else if let d = value as? Double { number = d }
        else { number = nil }
        guard let n = number, n > 0, n <= 86400 else {
            throw ConfigError(key: key, problem: "expected a number of seconds between 0 and 86400")
        }
        return n
    }

    /// A size in bytes: a whole number, or a number with a unit (`500MB`,
    /// `50GiB`, `1.5TB`): kB/KB/MB/GB/TB are powers of 1000; KiB/MiB/GiB/TiB
    /// and bare K/M/G/T, as `df -h` writes them, powers of 1024.
    func byteSize() throws -> Int64 {
        let problem = "expected a size in bytes, like 50GiB, 500MB or 1073741824"
        if let i = value as? Int {
            guard i > 0 else { throw ConfigError(key: key, problem: problem) }
            return Int64(i)
        }
        if let d = value as? Double {  // 5.0e10 in YAML
            guard d >= 1, d < 9e18 else { throw ConfigError(key: key, problem: problem) }
            return Int64(d)
        }
        guard let text = (value as? String)?.trimmingCharacters(in: .whitespaces) else {
            throw ConfigError(key: key, problem: problem)
        }
        let units: [(String, Double)] = [
            ("KiB", 1024), ("MiB", 1_048_576), ("GiB", 1_073_741_824), ("TiB", 1_099_511_627_776),
            ("KB", 1e3), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12),
            ("K", 1024), ("M", 1_048_576), ("G", 1_073_741_824), ("T", 1_099_511_627_776), ("B", 1),
        ]
        var number = Substring(text)
        var scale = 1.0
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            number = text.dropLast(suffix.count)
            scale = factor
            break
        }
        guard let n = Double(number.trimmingCharacters(in: .whitespaces)), n * scale >= 1, n * scale < 9e18,
              number.allSatisfy({ $0.isNumber || $0 == "." || $0 == " " }) else {
            throw ConfigError(key: key, problem: problem)
        }
        return Int64(n * scale)
    }

    /// A path to a file the proxy can read now (certificates, keys,
    /// secrets): a typo stops the start, not the first TLS handshake.
    func readableFile() throws -> String {
        let path = try string()
        guard !path.isEmpty, FileManager.default.isReadableFile(atPath: path) else {
            throw ConfigError(key: key, problem: "cannot read the file \"\(path)\"")
        }
        return path
    }

    /// A fraction in (0, 1].
    func fraction() throws -> Double {
        let number: Double? = (value as? Int).map(Double.init) ?? (value as? Double)
        guard let n = number, n > 0, n <= 1 else {
            throw ConfigError(key: key, problem: "expected a fraction of storage.max_size, above 0 and at most 1")
        }
        return n
    }

    fileprivate func join(_ child: String) -> String { key == "(top level)" || key.isEmpty ? child : "\(key).\(child)" }
}

struct Mapping {
    let values: [String: Any]
    let key: String

    func has(_ name: String) -> Bool { values[name] != nil }

    func optional(_ name: String) -> Node? {
        guard let v = values[name], !(v is NSNull) else { return nil }
        return Node(value: v, key: key.isEmpty ? name : "\(key).\(name)")
    }

    func required(_ name: String) throws -> Node {
        guard let node = optional(name) else {
            throw ConfigError(key: key.isEmpty ? name : "\(key).\(name)", problem: "missing")
        }
        return node
    }
}
