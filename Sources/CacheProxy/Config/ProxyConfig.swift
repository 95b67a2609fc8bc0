/// The whole configuration, after validation. Every field has a value: the
/// defaults live in `ConfigLoader`, next to the key names they belong to.
public struct ProxyConfig: Sendable, Equatable {
    public struct API: Sendable, Equatable {
        public var hostname: String
        public var port: Int
        /// Take `X-Forwarded-Proto`/`X-Forwarded-Host` from clients as true.
        /// Only for a proxy that is reached solely through a TLS terminator
        /// (or load balancer) that sets them; otherwise a client could name
        /// any scheme and host in the `Location` headers it gets back.
        public var trustForwardedHeaders: Bool = false
        /// PEM certificate chain and key: with them the listener speaks TLS
        /// (on `tlsPort` when one is set, with `port` staying plaintext).
        public var tlsCert: String?
        public var tlsKey: String?
        public var tlsPort: Int?
    }

    /// Whether a cached blob is served only to a client the upstream would
    /// serve it to (DESIGN.md, Security).
    public enum AccessCheck: String, Sendable, Equatable {
        /// An upstream `HEAD` with the client's credentials decides, its
        /// answer remembered for `accessCacheTTL`.
        case always
        /// Anyone who knows a digest gets the blob (the reference design's
        /// behaviour): only for mirrors of public images.
        case never
    }

    /// What a hit gets when the upstream cannot be asked.
    public enum Offline: String, Sendable, Equatable {
        /// Served when this credential was allowed this repository before.
        case serve
        /// Refused with the upstream's failure (502/504).
        case deny
    }

    /// How manifests are answered (DESIGN.md, Manifest by tag).
    public enum Manifests: String, Sendable, Equatable {
        /// By digest from the cache like a blob; by tag, the upstream's
        /// `HEAD` names the digest (a rate-limit-free request at Docker
        /// Hub) and the body comes from the cache; offline, the tag's last
        /// digest.
        case revalidate
        /// Every manifest request goes to the upstream as it is.
        case passthrough
    }

    /// The proxy's own account at an upstream, used for clients that send
    /// no `Authorization`. Never printed: `description` hides the password.
    public struct Credentials: Sendable, Equatable, CustomStringConvertible, CustomReflectable {
        public var username: String
        public var password: String
        public var description: String { "Credentials(username: \(username), password: <hidden>)" }
        public var customMirror: Mirror { Mirror(self, children: ["username": username]) }
        public init(username: String, password: String) {
            self.username = username
            self.password = password
        }
    }

    /// How the proxy verifies an upstream and presents itself to it.
    public struct UpstreamTLS: Sendable, Equatable {
        /// PEM file of the CAs trusted for this upstream (in place of the
        /// system's).
        public var caFile: String?
        /// PEM certificate chain and key presented to an upstream that asks
        /// for a client certificate.
        public var clientCert: String?
        public var clientKey: String?
        /// No verification at all: anyone on the path can serve the bytes.
        /// Blobs are still checked against their digests; manifests are not.
        public var insecure: Bool = false
        public init() {}
    }

    public struct Upstream: Sendable, Equatable {
        /// Incoming `Host` value that selects this upstream (port optional).
        public var host: String
        /// Upstream registry host name.
        public var registry: String
        public var port: Int
        /// `http` or `https`.
        public var schema: String
        /// Extra names containerd may send as `?ns=` for this registry
        /// (`docker.io` for Docker Hub is added automatically).
        public var aliases: [String]
        public var accessCheck: AccessCheck = .always
        /// How long an upstream's yes to (credential, repository) is believed.
        public var accessCacheTTL: Double = 60
        public var offline: Offline = .serve
        public var credentials: Credentials?
        public var tls = UpstreamTLS()
        /// Blob downloads from this upstream at once (`FillSlots`); more
        /// wait in a bounded queue. containerd and Docker fetch three
        /// layers at a time per image.
        public var maxFills: Int = 32
        public var manifests: Manifests = .revalidate

        /// `scheme://registry[:port]`, with the port left out when it is the
        /// scheme's default, as registries write it in `Location` headers.
        public var origin: String {
            let defaultPort = schema == "https" ? 443 : 80
            return port == defaultPort ? "\(schema)://\(registry)" : "\(schema)://\(registry):\(port)"
        }

        /// The `Host` header value the upstream expects.
        public var authority: String {
            let defaultPort = schema == "https" ? 443 : 80
            return port == defaultPort ? registry : "\(registry):\(port)"
        }
    }

    /// Which storage backend `storage.io_backend` / `--io-backend` asks for.
    public enum IOBackendChoice: String, Sendable, Equatable {
        /// The choice named `text`, or an error naming `key`.
        public init(parsing text: String, key: String) throws {
            guard let choice = Self(rawValue: text) else {
                throw ConfigError(key: key, problem: "must be auto, io_uring or threadpool, not \"\(text)\"")
            }
            self = choice
        }

        /// io_uring when a ring can be set up, else the thread pool.
        case auto
        /// io_uring or refuse to start.
        case ioUring = "io_uring"
        case threadpool
    }

    public struct Storage: Sendable, Equatable {
        public var folder: String
        /// fsync a completed blob (and then its directory) before and after
        /// it is renamed into `blobs/`.
        public var fsync: Bool
        public var ioBackend: IOBackendChoice = .auto
        /// Bytes of complete blobs the cache may keep; nil: no limit.
        public var maxSize: Int64?
        /// Eviction starts when the cache holds more than this share of
        /// `maxSize`, and removes least recently used blobs until it holds
        /// no more than `lowWatermark` of it.
        public var highWatermark: Double = 0.95
        public var lowWatermark: Double = 0.90

        public init(folder: String, fsync: Bool) {
            self.folder = folder
            self.fsync = fsync
        }
    }

    /// Each timeout bounds one wait and nothing else, so that no deadline
    /// can cut a transfer that is still moving (DESIGN.md, Timeouts).
    public struct Timeouts: Sendable, Equatable {
        /// TCP (and TLS) connect to an upstream.
        public var connectSeconds: Double = 5
        /// From the request (body included) fully sent upstream to the
        /// upstream's response head.
        public var upstreamSeconds: Double = 30
        /// Between two reads of an upstream's response body.
        public var upstreamIdleSeconds: Double = 30
        /// From the first byte of a client's request head to its end.
        public var headerReadSeconds: Double = 30
        /// A keep-alive connection with no request in progress.
        public var idleSeconds: Double = 60
        /// Between two reads of a client's request body, counted only while
        /// the proxy is asking for more (an upstream that pushes back does
        /// not count against the client).
        public var requestBodySeconds: Double = 60
        /// A response that makes no progress towards the client (nginx's
        /// `send_timeout`).
        public var sendSeconds: Double = 60
        /// From the first shutdown signal to exit, everything included.
        public var shutdownSeconds: Double = 30

        public init() {}
    }

    public var api: API
    public var upstreams: [Upstream]
    public var storage: Storage
    public var timeouts: Timeouts
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    public var maxHeaderBytes: Int
    public var logLevel: String
    /// `text` (one readable line per request or event) or `json` (one
    /// object a line, for log shippers).
    public var logFormat: LogFormat = .text
}

/// How log lines are written (`log_format`, `--log-format`).
public enum LogFormat: String, Sendable, Equatable {
    case text
    case json

    public init(parsing text: String, key: String) throws {
        guard let format = Self(rawValue: text) else { throw ConfigError(key: key, problem: "must be text or json") }
        self = format
    }
}
