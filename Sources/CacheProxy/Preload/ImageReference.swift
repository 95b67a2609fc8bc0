/// An image named on `cache-proxy preload`'s command line or in its list:
/// `HOST/REPO:TAG` or `HOST/REPO@DIGEST`, HOST one of the configured
/// upstreams (its `host`, registry or an alias; `docker.io` for Docker Hub).
public struct ImageReference: Sendable, Equatable, CustomStringConvertible {
    public let upstream: ProxyConfig.Upstream
    public let repository: String
    public let reference: ManifestReference
    /// As the user wrote it, for progress lines and errors.
    public let description: String

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public init(parsing text: String, upstreams: [ProxyConfig.Upstream]) throws(Invalid) {
        description = text
        guard let slash = text.firstIndex(of: "/") else {
            throw Invalid(description: "\(text): no registry host (write HOST/REPO:TAG, e.g. docker.io/library/alpine:3.20)")
        }
        let host = text[..<slash].lowercased()
        let router = Router(upstreams: upstreams)
        guard let upstream = router.route(host: host, namespace: Substring(host)) else {
            throw Invalid(description: "\(text): \(host) is not a configured upstream host, registry or alias")
        }
        var rest = text[text.index(after: slash)...]
        var reference: ManifestReference
        if let at = rest.firstIndex(of: "@") {
            guard let digest = try? Digest(parsing: rest[rest.index(after: at)...]) else {
                throw Invalid(description: "\(text): the digest is not valid")
            }
            reference = .digest(digest)
            rest = rest[..<at]
            // `repo:tag@digest` (as `docker images --digests` writes it):
            // the digest decides, the tag is dropped.
            if let colon = rest.lastIndex(of: ":"), !rest[colon...].contains("/") { rest = rest[..<colon] }
        } else if let colon = rest.lastIndex(of: ":"), !rest[colon...].contains("/") {
            let tag = rest[rest.index(after: colon)...]
            guard ManifestReference.isValidTag(tag) else { throw Invalid(description: "\(text): the tag is not valid") }
            reference = .tag(String(tag))
            rest = rest[..<colon]
        } else {
            reference = .tag("latest")
        }
        var repository = String(rest)
        // Docker Hub's official images live under `library/`.
        if upstream.registry == "registry-1.docker.io", !repository.contains("/") { repository = "library/" + repository }
        guard RepositoryName.isValid(Substring(repository)) else {
            throw Invalid(description: "\(text): \(repository) is not a valid repository name")
        }
        self.upstream = upstream
        self.repository = repository
        self.reference = reference
    }

    /// The reference as the registry API writes it after `/manifests/`.
    var referencePath: String {
        switch reference {
        case .digest(let digest): return digest.description
        case .tag(let tag): return tag
        }
    }
}

/// `OS/ARCH[/VARIANT]`, as `--platform` takes it and an index lists it.
public struct Platform: Sendable, Equatable, CustomStringConvertible {
    public let os: String
    public let architecture: String
    public let variant: String?

    public init(os: String, architecture: String, variant: String? = nil) {
        (self.os, self.architecture, self.variant) = (os, architecture, variant)
    }

    public init?(parsing text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard (2...3).contains(parts.count), parts.allSatisfy({ !$0.isEmpty }) else { return nil }
        self.init(os: parts[0], architecture: parts[1], variant: parts.count == 3 ? parts[2] : nil)
    }

    /// This machine's own platform: what a pull here would pick.
    public static var current: Platform {
        #if arch(x86_64)
        return Platform(os: "linux", architecture: "amd64")
        #elseif arch(arm64)
        return Platform(os: "linux", architecture: "arm64")
        #elseif arch(arm)
        return Platform(os: "linux", architecture: "arm", variant: "v7")
        #else
        return Platform(os: "linux", architecture: "unknown")
        #endif
    }

    public var description: String { [os, architecture, variant].compactMap { $0 }.joined(separator: "/") }

    /// Whether an index entry of `other` is what was asked for: a variant
    /// asked for must match; none asked for takes any.
    func matches(_ other: Platform) -> Bool {
        os == other.os && architecture == other.architecture && (variant == nil || variant == other.variant)
    }
}
