/// The whole configuration, after validation. Every field has a value: the
/// defaults live in `ConfigLoader`, next to the key names they belong to.
public struct ProxyConfig: Sendable, Equatable {
    public struct API: Sendable, Equatable {
        public var hostname: String
        public var port: Int
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

    public struct Storage: Sendable, Equatable {
        public var folder: String
        /// fsync a completed blob before it is renamed into `blobs/`.
        public var fsync: Bool
    }

    public struct Timeouts: Sendable, Equatable {
        /// TCP (and TLS) connect to an upstream.
        public var connectSeconds: Double
        /// Waiting for an upstream's response head, and for each read after it.
        public var upstreamSeconds: Double
        /// A client's whole request head must arrive within this, counted from
        /// its first byte (or the end of the previous response).
        public var headerReadSeconds: Double
        /// How long SIGTERM waits for in-flight work.
        public var shutdownSeconds: Double
    }

    public var api: API
    public var upstreams: [Upstream]
    public var storage: Storage
    public var timeouts: Timeouts
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    public var maxHeaderBytes: Int
    public var logLevel: String
}
