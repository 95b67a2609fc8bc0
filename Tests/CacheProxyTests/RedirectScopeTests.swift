import Foundation
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// A redirect from an upstream is followed from inside the proxy's network:
/// it may lead to a loopback, link-local or private address only when the
/// upstream itself is on an address of that scope.
final class RedirectScopeTests: XCTestCase {
    typealias F = FaultInjectionTests

    func testAddressesAreSortedIntoScopes() throws {
        let cases: [(String, AddressScope)] = [
            ("127.0.0.1", .loopback), ("127.9.9.9", .loopback), ("0.0.0.0", .loopback), ("::1", .loopback),
            ("::", .loopback), ("::ffff:127.0.0.1", .loopback), ("[::1]", .loopback),
            ("169.254.169.254", .linkLocal), ("fe80::1", .linkLocal), ("::ffff:169.254.169.254", .linkLocal),
            ("10.1.2.3", .privateNetwork), ("172.16.0.1", .privateNetwork), ("172.31.255.255", .privateNetwork),
            ("192.168.1.1", .privateNetwork), ("100.64.0.1", .privateNetwork), ("fd00::1", .privateNetwork),
            ("172.32.0.1", .publicNetwork), ("100.128.0.1", .publicNetwork), ("8.8.8.8", .publicNetwork),
            ("2001:db8::1", .publicNetwork), ("224.0.0.1", .unusable), ("255.255.255.255", .unusable),
            ("ff02::1", .unusable), ("64:ff9b::a9fe:a9fe", .linkLocal), ("2002:a00:1::1", .privateNetwork),
            ("fec0::1", .privateNetwork), ("198.18.0.1", .privateNetwork), ("192.0.0.1", .unusable),
        ]
        for (text, scope) in cases {
            let bytes = try XCTUnwrap(AddressScope.literal(text), text)
            XCTAssertEqual(AddressScope(bytes: bytes), scope, text)
        }
        XCTAssertNil(AddressScope.literal("registry.example"))
    }

    func testAnInnerTargetNeedsAnUpstreamOfTheSameScope() {
        let allowed = AddressScope.redirectAllowed
        XCTAssertTrue(allowed([.publicNetwork], [.publicNetwork]))
        XCTAssertFalse(allowed([.loopback], [.publicNetwork]))
        XCTAssertFalse(allowed([.linkLocal], [.publicNetwork]))
        XCTAssertFalse(allowed([.privateNetwork], [.publicNetwork]))
        XCTAssertFalse(allowed([.linkLocal], [.loopback]), "metadata is not the loopback upstream's to reach")
        XCTAssertFalse(allowed([.loopback], [.privateNetwork]))
        XCTAssertTrue(allowed([.privateNetwork], [.privateNetwork]), "storage beside a private registry")
        XCTAssertTrue(allowed([.loopback], [.loopback]))
        XCTAssertFalse(allowed([.publicNetwork, .loopback], [.publicNetwork]), "one inner address is enough to refuse")
        XCTAssertFalse(allowed([.unusable], [.unusable]))
    }

    /// Says a name leads where the test wants, without DNS; anything else
    /// is resolved as usual.
    struct MapResolver: HostResolver {
        let names: [String: [UInt8]]
        func addresses(of host: String) async -> [[UInt8]] {
            if let mapped = names[host] { return [mapped] }
            return await SystemResolver().addresses(of: host)
        }
    }

    /// A name that does not resolve when checked is refused, not left to
    /// the connection (which resolves again and may get another answer);
    /// so is an IPv6 zone.
    func testARedirectToANameThatDoesNotResolveOrToAZoneIsRefused() async throws {
        let targets = ["http://nowhere.invalid/blob", "http://[fe80::1%25eth0]/blob"]
        let upstream = try await FakeUpstream { head in
            .init(status: .temporaryRedirect, headers: ["location": head.uri.contains("/r0/") ? targets[0] : targets[1]])
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {shutdown: 1}")
        for repository in ["r0", "r1"] {
            let url = "\(proxy.base)/v2/\(repository)/blobs/sha256:\(String(repeating: "a", count: 64))"
            let answer = try shell("curl", ["-s", "--max-time", "10", url]).output
            XCTAssertTrue(answer.contains("redirected to an address the proxy does not follow"), "\(repository): \(answer)")
        }
        await proxy.stop()
        await upstream.stop()
    }

    /// A look-up slower than `timeouts.connect` (a DNS server that drops
    /// queries) is not waited out: the redirect is refused at the timeout.
    func testARedirectWhoseNameResolvesTooSlowlyIsRefusedAtTheConnectTimeout() async throws {
        struct SlowResolver: HostResolver {
            func addresses(of host: String) async -> [[UInt8]] {
                // Not cancellable, like a getaddrinfo that has started.
                if host == "slow.test" { await Task.detached { try? await Task.sleep(for: .seconds(4)) }.value }
                return await SystemResolver().addresses(of: host)
            }
        }
        let upstream = try await FakeUpstream { _ in
            .init(status: .temporaryRedirect, headers: ["location": "http://slow.test/blob"])
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
            extraYAML: "timeouts: {connect: 0.5, shutdown: 1}", resolver: SlowResolver())
        let start = ContinuousClock.now
        let answer = try shell("curl", ["-s", "--max-time", "10",
                                        "\(proxy.base)/v2/r/blobs/sha256:\(String(repeating: "b", count: 64))"]).output
        XCTAssertLessThan(ContinuousClock.now - start, .seconds(2), "the look-up was waited out")
        XCTAssertTrue(answer.contains("redirected to an address the proxy does not follow"), answer)
        await proxy.stop()
        await upstream.stop()
    }

    /// An upstream the proxy takes for a public one (`localhost`, said to be
    /// at 203.0.113.7) redirects a blob to a service on the proxy's own
    /// loopback: refused with 502, and the service sees nothing. The same
    /// redirect from an upstream on loopback is followed.
    func testAPublicUpstreamCannotRedirectIntoTheProxysHost() async throws {
        let blob = F.randomBytes(10_000)
        let inside = try await FakeUpstream { _ in .init(body: blob) }
        let upstream = try await FakeUpstream { head in
            .init(status: .temporaryRedirect, headers: ["location": "http://127.0.0.1:\(inside.port)/internal\(head.uri)"])
        }
        let yaml = "  - {host: \"127.0.0.1\", registry: \"localhost\", port: \(upstream.port), schema: \"http\"}"
        let publicProxy = try await TestProxy(upstreamsYAML: yaml, extraYAML: "timeouts: {shutdown: 1}",
                                              resolver: MapResolver(names: ["localhost": [203, 0, 113, 7]]))
        let refused = try shell("curl", ["-s", "--max-time", "5", "\(publicProxy.base)/v2/a/blobs/\(F.digest(of: blob))"]).output
        XCTAssertTrue(refused.contains("redirected to an address the proxy does not follow"), refused)
        XCTAssertEqual(upstream.gets.count, 1)
        XCTAssertEqual(inside.requests.count, 0, "the proxy reached its own host for the upstream")
        await publicProxy.stop()

        let loopbackProxy = try await TestProxy(upstreamsYAML: yaml, extraYAML: "timeouts: {shutdown: 1}")
        XCTAssertEqual(try curl("\(loopbackProxy.base)/v2/a/blobs/\(F.digest(of: blob))").body, Data(blob))
        XCTAssertEqual(inside.requests.count, 1)
        await loopbackProxy.stop()
        await upstream.stop()
        await inside.stop()
    }
}
