import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// Where an address leads, as far as a redirect is concerned: the proxy's
/// own host, its link (cloud metadata at 169.254.169.254 lives there), its
/// private network, or the internet.
///
/// A redirect from an upstream is followed by the proxy, from inside the
/// proxy's network: an upstream (or anyone who can make it redirect) must
/// not use the proxy to reach what only the proxy can reach. So a redirect
/// may lead to a loopback, link-local or private address only when the
/// upstream itself is on an address of the same scope (a registry on the
/// same private network may well send its blobs to storage beside it).
public enum AddressScope: Sendable, Hashable {
    /// 127/8, ::1, and the unspecified address (which Linux connects to
    /// the local host).
    case loopback
    /// 169.254/16, fe80::/10.
    case linkLocal
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier-grade NAT), fc00::/7.
    case privateNetwork
    case publicNetwork
    /// Multicast, broadcast, reserved: never a server.
    case unusable

    /// The scope of a raw address: 4 bytes (IPv4) or 16 (IPv6), network order.
    public init(bytes: [UInt8]) {
        if bytes.count == 4 {
            self = Self.v4(bytes[0], bytes[1], bytes[2])
            return
        }
        guard bytes.count == 16 else {
            self = .unusable
            return
        }
        let isMappedV4 = bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xff && bytes[11] == 0xff
        // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach the IPv4
        // address they carry.
        let isNAT64 = bytes[0..<12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]
        if isMappedV4 || isNAT64 {
            self = Self.v4(bytes[12], bytes[13], bytes[14])
        } else if bytes[0] == 0x20 && bytes[1] == 0x02 {
            self = Self.v4(bytes[2], bytes[3], bytes[4])
        } else if bytes[0] == 0xfe && bytes[1] & 0xc0 == 0xc0 {
            self = .privateNetwork  // fec0::/10, the old site-local
        } else if bytes[0..<15].allSatisfy({ $0 == 0 }) && (bytes[15] == 1 || bytes[15] == 0) {
            self = .loopback
        } else if bytes[0] == 0xfe && bytes[1] & 0xc0 == 0x80 {
            self = .linkLocal
        } else if bytes[0] & 0xfe == 0xfc {
            self = .privateNetwork
        } else if bytes[0] == 0xff {
            self = .unusable
        } else {
            self = .publicNetwork
        }
    }

    private static func v4(_ a: UInt8, _ b: UInt8, _ c: UInt8) -> AddressScope {
        switch (a, b) {
        case (127, _), (0, _): return .loopback
        case (169, 254): return .linkLocal
        case (10, _), (192, 168): return .privateNetwork
        case (172, _) where b & 0xf0 == 16: return .privateNetwork
        case (100, _) where b & 0xc0 == 64: return .privateNetwork
        case (198, 18), (198, 19): return .privateNetwork  // benchmarking networks
        case (192, 0) where c == 0 || c == 2: return .unusable  // protocol assignments, documentation
        case (224..., _): return .unusable
        default: return .publicNetwork
        }
    }

    /// The address written as an IP literal (`10.0.0.1`, `::1`, `[::1]`),
    /// or nil for a host name.
    public static func literal(_ host: String) -> [UInt8]? {
        var text = host
        if text.hasPrefix("["), text.hasSuffix("]") { text = String(text.dropFirst().dropLast()) }
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            return withUnsafeBytes(of: &v4) { Array($0) }
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            return withUnsafeBytes(of: &v6) { Array($0) }
        }
        return nil
    }

    /// Whether a redirect to an address of scopes `target` may be followed
    /// for an upstream whose own address has scopes `upstream`: a public
    /// target always; an inner one only when the upstream is in that same
    /// scope; an unusable one never.
    public static func redirectAllowed(to target: Set<AddressScope>, from upstream: Set<AddressScope>) -> Bool {
        target.allSatisfy { scope in
            switch scope {
            case .publicNetwork: return true
            case .unusable: return false
            default: return upstream.contains(scope)
            }
        }
    }
}

/// Turns a host name into addresses, for the redirect check. A protocol so
/// that tests can say where a name leads without a DNS server.
public protocol HostResolver: Sendable {
    /// The host's addresses, 4 or 16 bytes each; empty when it has none.
    func addresses(of host: String) async -> [[UInt8]]
}

/// The system's resolver (`getaddrinfo`, which reads /etc/hosts too). It
/// blocks, so it runs on two threads of its own: never on NIO's pool, which
/// the disk and TLS reads use, so a DNS server that drops queries (and
/// `getaddrinfo` then waits its whole retry schedule) delays redirects, not
/// every fill's writes. The caller bounds the wait (`UpstreamClient`).
public struct SystemResolver: HostResolver {
    private static let threads: NIOThreadPool = {
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        return pool
    }()

    public init() {}

    public func addresses(of host: String) async -> [[UInt8]] {
        if let literal = AddressScope.literal(host) { return [literal] }
        return (try? await Self.threads.runIfActive { Self.lookup(host) }) ?? []
    }

    private static func lookup(_ host: String) -> [[UInt8]] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, nil, &hints, &list) == 0, let first = list else { return [] }
        defer { freeaddrinfo(first) }
        var out: [[UInt8]] = []
        var entry: UnsafeMutablePointer<addrinfo>? = first
        while let current = entry {
            if let address = current.pointee.ai_addr {
                switch Int32(current.pointee.ai_family) {
                case AF_INET:
                    address.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { v4 in
                        var raw = v4.pointee.sin_addr
                        out.append(withUnsafeBytes(of: &raw) { Array($0) })
                    }
                case AF_INET6:
                    address.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { v6 in
                        var raw = v6.pointee.sin6_addr
                        out.append(withUnsafeBytes(of: &raw) { Array($0) })
                    }
                default:
                    break
                }
            }
            entry = current.pointee.ai_next
        }
        return out
    }
}
