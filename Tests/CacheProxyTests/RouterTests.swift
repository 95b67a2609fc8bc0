import Foundation
import XCTest
@testable import CacheProxy

final class RouterTests: XCTestCase {
    let hub = ProxyConfig.Upstream(host: "docker.mirror.local:5000", registry: "registry-1.docker.io", port: 443,
                                   schema: "https", aliases: [])
    let quay = ProxyConfig.Upstream(host: "quay.mirror.local", registry: "quay.io", port: 443, schema: "https",
                                    aliases: ["quay-alias.example"])
    let local = ProxyConfig.Upstream(host: "local.mirror", registry: "127.0.0.1", port: 5001, schema: "http",
                                     aliases: [])
    var router: Router { Router(upstreams: [hub, quay, local]) }

    func testHostWithPortThenWithout() {
        XCTAssertEqual(router.route(host: "docker.mirror.local:5000", namespace: nil), hub)
        XCTAssertEqual(router.route(host: "QUAY.mirror.local:8443", namespace: nil), quay, "port stripped, case folded")
        XCTAssertEqual(router.route(host: "quay.mirror.local", namespace: nil), quay)
        XCTAssertNil(router.route(host: "docker.mirror.local:6000", namespace: nil))
        XCTAssertNil(router.route(host: "unknown", namespace: nil))
        XCTAssertNil(router.route(host: nil, namespace: nil))
    }

    func testNamespaceWins() {
        XCTAssertEqual(router.route(host: "docker.mirror.local:5000", namespace: "quay.io"), quay)
        XCTAssertEqual(router.route(host: "anything", namespace: "docker.io"), hub, "docker.io names Docker Hub")
        XCTAssertEqual(router.route(host: "anything", namespace: "127.0.0.1:5001"), local, "registry:port")
        XCTAssertEqual(router.route(host: "anything", namespace: "quay-alias.example"), quay, "alias")
    }

    func testUnknownNamespaceLeavesItToHost() {
        XCTAssertEqual(router.route(host: "quay.mirror.local", namespace: "ghcr.io"), quay)
        XCTAssertNil(router.route(host: "nope", namespace: "ghcr.io"))
    }

    func testIPv6HostPort() {
        XCTAssertEqual(Router.stripPort("[::1]:5000"), "[::1]")
        XCTAssertEqual(Router.stripPort("[::1]"), "[::1]")
    }
}

final class RequestTargetTests: XCTestCase {
    let digest = "sha256:" + String(repeating: "a", count: 64)

    func testBlobReads() throws {
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/v2/library/alpine/blobs/\(digest)"),
                       .blob(name: "library/alpine", digest: try Digest(parsing: digest)))
        XCTAssertEqual(try RequestTarget.classify(method: "HEAD", uri: "/v2/a/blobs/\(digest)?ns=docker.io"),
                       .blob(name: "a", digest: try Digest(parsing: digest)))
    }

    func testEverythingElsePassesThrough() throws {
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/v2/"), .ping)
        XCTAssertEqual(try RequestTarget.classify(method: "POST", uri: "/v2/"), .passThrough)
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/v2/a/manifests/latest"),
                       .manifest(name: "a", reference: .tag("latest")))
        XCTAssertEqual(try RequestTarget.classify(method: "HEAD", uri: "/v2/a/b/manifests/\(digest)"),
                       .manifest(name: "a/b", reference: .digest(try Digest(parsing: digest))))
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/v2/blobs/manifests/v1"),
                       .manifest(name: "blobs", reference: .tag("v1")))
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/v2/a/manifests/-bad"), .passThrough)
        XCTAssertEqual(try RequestTarget.classify(method: "PUT", uri: "/v2/a/manifests/latest"), .passThrough)
        XCTAssertThrowsError(try RequestTarget.classify(method: "GET", uri: "/v2/a/manifests/sha256:zz"))
        XCTAssertThrowsError(try RequestTarget.classify(method: "GET", uri: "/v2/manifests/latest"))
        XCTAssertEqual(try RequestTarget.classify(method: "POST", uri: "/v2/a/blobs/uploads/"), .passThrough)
        XCTAssertEqual(try RequestTarget.classify(method: "PATCH", uri: "/v2/a/blobs/uploads/abc-123"), .passThrough)
        XCTAssertEqual(try RequestTarget.classify(method: "DELETE", uri: "/v2/a/blobs/\(digest)"), .passThrough)
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/metrics"), .metrics)
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/readyz"), .readyz)
        // Paths are compared as bytes: a look-alike that Unicode calls
        // equivalent (U+212A KELVIN SIGN is canonically `K`) is not the
        // path it looks like, nor is a path with a combining mark.
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/metrics\u{301}"), .passThrough)
        XCTAssertEqual(try RequestTarget.classify(method: "GET", uri: "/v2\u{301}/"), .passThrough)
        XCTAssertThrowsError(try RequestTarget.classify(method: "GET", uri: "/v2/a/blobs/uploads\u{301}")) {
            XCTAssertEqual($0 as? RequestTarget.Rejection, .digestInvalid("digest must be <algorithm>:<hex>"))
        }
        XCTAssertThrowsError(try RequestTarget.classify(method: "GET", uri: "/v2/\u{212A}/manifests/latest"))
    }

    func testQueryValueIsPercentDecoded() {
        XCTAssertEqual(RequestURI.queryValue("ns", in: "/v2/a/manifests/x?ns=127.0.0.1%3A5001"), "127.0.0.1:5001")
        XCTAssertEqual(RequestURI.queryValue("ns", in: "/v2/?n=1&ns=docker.io"), "docker.io")
        XCTAssertNil(RequestURI.queryValue("ns", in: "/v2/"))
    }

    func testRejectsBadNamesDigestsAndTraversal() {
        let bad: [(String, RequestTarget.Rejection)] = [
            ("/v2/a/blobs/md5:abc", .digestInvalid("")),
            ("/v2/a/blobs/sha256:\(String(repeating: "A", count: 64))", .digestInvalid("")),
            ("/v2/../etc/blobs/\(digest)", .nameInvalid("")),
            ("/v2/a/%2e%2e/blobs/\(digest)", .nameInvalid("")),
            ("/v2/a%2Fb/blobs/\(digest)", .nameInvalid("")),
            ("/v2/a/blobs/sha256:%2e%2e%2f", .nameInvalid("")),
            ("/v2/Upper/blobs/\(digest)", .nameInvalid("")),
            ("/v2/a//b/blobs/\(digest)", .nameInvalid("")),
            ("/v2/a/../../manifests/x", .nameInvalid("")),
        ]
        for (uri, expected) in bad {
            XCTAssertThrowsError(try RequestTarget.classify(method: "GET", uri: uri), uri) { error in
                switch (error as? RequestTarget.Rejection, expected) {
                case (.digestInvalid?, .digestInvalid), (.nameInvalid?, .nameInvalid): break
                default: XCTFail("\(uri): \(error)")
                }
            }
        }
    }

    func testRepositoryNameGrammar() {
        for good in ["a", "library/alpine", "a.b_c__d--e/f-g", "x0/y1/z2"] {
            XCTAssertTrue(RepositoryName.isValid(Substring(good)), good)
        }
        for bad in ["", "A", "a/", "/a", "a..b", "a___b", "-a", "a-", "a b", "a/.b"] {
            XCTAssertFalse(RepositoryName.isValid(Substring(bad)), bad)
        }
    }

    /// The hand-written one-pass check against the spec's own regular
    /// expression, over random names from the grammar's alphabet.
    func testRepositoryNameAgreesWithTheSpecsExpression() throws {
        let spec = try NSRegularExpression(
            pattern: #"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$"#)
        let alphabet = Array("ab09._-/A ")
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<20_000 {
            let name = String((0..<Int.random(in: 1...9, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
            let matches = spec.firstMatch(in: name, range: NSRange(name.startIndex..., in: name)) != nil
            XCTAssertEqual(RepositoryName.isValid(Substring(name)), matches, name)
        }
    }
}

final class PassThroughRulesTests: XCTestCase {
    let upstream = ProxyConfig.Upstream(host: "m", registry: "reg.example", port: 5000, schema: "http", aliases: [])

    func testLocationRewrite() {
        XCTAssertEqual(PassThrough.rewriteLocation("http://reg.example:5000/v2/a/blobs/uploads/1?_state=x",
                                                   upstream: upstream, clientHost: "proxy:5555", clientScheme: "http"),
                       "http://proxy:5555/v2/a/blobs/uploads/1?_state=x")
        XCTAssertEqual(PassThrough.rewriteLocation("/v2/a/blobs/uploads/1", upstream: upstream, clientHost: "p", clientScheme: "http"),
                       "/v2/a/blobs/uploads/1", "relative stays")
        XCTAssertEqual(PassThrough.rewriteLocation("https://cdn.example/x", upstream: upstream, clientHost: "p", clientScheme: "http"),
                       "https://cdn.example/x", "other hosts stay")
        XCTAssertEqual(PassThrough.rewriteLocation("http://reg.example:50001/x", upstream: upstream, clientHost: "p", clientScheme: "http"),
                       "http://reg.example:50001/x", "a longer port is another host")
        XCTAssertEqual(PassThrough.rewriteLocation("http://reg.example:5000/v2/x", upstream: upstream,
                                                   clientHost: "mirror.example", clientScheme: "https"),
                       "https://mirror.example/v2/x", "the client's scheme, not a hard-coded http")
    }

    func testHopByHopHeadersDropped() {
        let out = PassThrough.endToEnd([
            "Connection": "close, X-Secret", "Keep-Alive": "5", "X-Secret": "1", "Transfer-Encoding": "chunked",
            "Authorization": "Bearer t", "Accept": "*/*",
        ])
        XCTAssertEqual(Set(out.map { $0.name.lowercased() }), ["authorization", "accept"])
    }

    func testNamespaceParameterDropped() {
        XCTAssertEqual(PassThrough.upstreamURI("/v2/a/manifests/x?ns=docker.io"), "/v2/a/manifests/x")
        XCTAssertEqual(PassThrough.upstreamURI("/v2/a/tags/list?n=5&ns=docker.io"), "/v2/a/tags/list?n=5")
        XCTAssertEqual(PassThrough.upstreamURI("/v2/"), "/v2/")
    }
}
