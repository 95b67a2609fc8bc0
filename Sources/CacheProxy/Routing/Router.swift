/// Picks the upstream for a request.
///
/// containerd names the registry it means in `?ns=<registry>` when it talks to
/// a mirror; that wins when it matches a configured upstream, because one
/// proxy host name then serves several registries. Otherwise the `Host`
/// header decides, first with its port and then without.
public struct Router: Sendable {
    private let byHost: [String: ProxyConfig.Upstream]
    private let byNamespace: [String: ProxyConfig.Upstream]

    public init(upstreams: [ProxyConfig.Upstream]) {
        var byHost: [String: ProxyConfig.Upstream] = [:]
        var byNamespace: [String: ProxyConfig.Upstream] = [:]
        for upstream in upstreams {
            byHost[upstream.host] = byHost[upstream.host] ?? upstream
            var names = [upstream.registry, "\(upstream.registry):\(upstream.port)"] + upstream.aliases
            if upstream.registry == "registry-1.docker.io" { names.append("docker.io") }
            for name in names { byNamespace[name] = byNamespace[name] ?? upstream }
        }
        self.byHost = byHost
        self.byNamespace = byNamespace
    }

    /// - Parameters:
    ///   - host: the request's `Host` header, if any.
    ///   - namespace: containerd's `ns` query parameter, if any.
    public func route(host: String?, namespace: Substring?) -> ProxyConfig.Upstream? {
        if let ns = namespace, let upstream = byNamespace[ns.lowercased()] {
            return upstream
        }
        guard let host = host?.lowercased(), !host.isEmpty else { return nil }
        if let upstream = byHost[host] { return upstream }
        return byHost[Self.stripPort(host)]
    }

    /// `host:port` ─► `host`; `[::1]:5000` ─► `[::1]`.
    static func stripPort(_ host: String) -> String {
        guard let colon = host.lastIndex(of: ":") else { return host }
        if host.hasPrefix("["), let bracket = host.lastIndex(of: "]"), bracket > colon { return host }
        return String(host[..<colon])
    }
}
