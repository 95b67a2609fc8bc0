import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// Manifests through the cache (DESIGN.md, Manifest by tag), against the
/// real distribution registry with skopeo, and against a fake upstream for
/// what a real registry does not do (429s, wrong bytes).
final class ManifestCacheTests: XCTestCase {
    static func sha256(_ data: Data) -> String {
        "sha256:" + SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }

    func upstreamYAML(_ registry: Registry, _ extra: String = "") -> String {
        "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: \"http\"\(extra)}"
    }

    /// `skopeo copy` of `reference` through the proxy into a new folder:
    /// the manifest's bytes, or nil with skopeo's output when it failed.
    func pull(_ proxy: TestProxy, _ reference: String, creds: String? = nil) throws -> (Data?, String) {
        let out = try makeTemporaryFolder("pull")
        var arguments = ["copy", "--src-tls-verify=false", "--preserve-digests"]
        if let creds { arguments += ["--src-creds", creds] }
        let (status, output) = try shell("skopeo", arguments + ["docker://127.0.0.1:\(proxy.port)/\(reference)",
                                                                "dir:\(out)"])
        guard status == 0 else { return (nil, output) }
        return (try Data(contentsOf: URL(fileURLWithPath: out + "/manifest.json")), output)
    }

    struct Answer {
        let exitCode: Int32
        let code: Int
        /// Lower-cased names, the last response's.
        let headers: [String: String]
        let body: Data
    }

    /// One request with curl, headers included.
    func curl(_ url: String, method: String = "GET", extra: [String] = []) throws -> Answer {
        let out = NSTemporaryDirectory() + "body-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: out) }
        var arguments = ["-s", "-D", "-", "-o", out, "--max-time", "30"]
        if method == "HEAD" { arguments.append("-I") }
        let (status, text) = try shell("curl", arguments + extra + [url])
        var code = 0
        var headers: [String: String] = [:]
        for line in text.split(separator: "\r\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("HTTP/") {
                code = Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
                headers = [:]
            } else if let colon = line.firstIndex(of: ":") {
                headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            }
        }
        let body = (try? Data(contentsOf: URL(fileURLWithPath: out))) ?? Data()
        return Answer(exitCode: status, code: code, headers: headers, body: body)
    }

    func testRepeatedPullsCostHeadsOnlyFollowTheTagAndSurviveAnOutageAndARestart() async throws {
        let registry = try Registry()
        let first = try TestImage.make(layerSizes: [4096, 60_000])
        try first.push(to: "\(registry.address)/test/app:v1")
        let folder = try makeTemporaryFolder("cache")
        let timeouts = "timeouts: {connect: 1, upstream: 3}"
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(registry), folder: folder, extraYAML: timeouts)

        var manifests: [Data] = []
        for _ in 1...2 {
            let (manifest, output) = try pull(proxy, "test/app:v1")
            XCTAssertNotNil(manifest, output)
            manifests.append(manifest ?? Data())
        }
        XCTAssertEqual(manifests[0], manifests[1], "the cached manifest is the upstream's, byte for byte")
        XCTAssertEqual(Self.sha256(manifests[0]), first.manifest)
        try await Task.sleep(for: .milliseconds(1200))  // distribution's access log follows the response
        XCTAssertEqual(registry.requests("GET", "/manifests/"), 1, "one manifest GET in all: \(registry.requests("GET", "/manifests/"))")
        XCTAssertGreaterThanOrEqual(registry.requests("HEAD", "/manifests/v1"), 2, "each pull asked for the tag")
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_manifest_hits_total"), 1)
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_misses_total"), 1)
        // The second pull named the first's manifest in `If-None-Match`, and
        // distribution answered 304 (without reading the manifest again).
        XCTAssertGreaterThanOrEqual(
            try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="200"}"#), 1)
        XCTAssertGreaterThanOrEqual(
            try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="304"}"#), 1)
        // A cached manifest by digest answers with the upstream's media type.
        let byDigest = try curl("\(proxy.base)/v2/test/app/manifests/\(first.manifest)", method: "HEAD")
        XCTAssertEqual(byDigest.code, 200)
        XCTAssertEqual(byDigest.headers["content-type"], "application/vnd.oci.image.manifest.v1+json")

        // The tag moves upstream: the next pull follows it.
        let second = try TestImage.make(layerSizes: [3000])
        try second.push(to: "\(registry.address)/test/app:v1")
        let (moved, movedOutput) = try pull(proxy, "test/app:v1")
        XCTAssertEqual(moved.map(Self.sha256), second.manifest, movedOutput)

        // The registry goes away: by tag (its last digest) and by digest.
        registry.stop()
        let (offlineTag, tagOutput) = try pull(proxy, "test/app:v1")
        XCTAssertEqual(offlineTag.map(Self.sha256), second.manifest, tagOutput)
        let (offlineDigest, digestOutput) = try pull(proxy, "test/app@\(first.manifest)")
        XCTAssertEqual(offlineDigest.map(Self.sha256), first.manifest, digestOutput)
        // The tag's answer came from the offline table (the digest's from
        // a still-fresh access answer: no upstream was needed for it).
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 1)
        await proxy.stop()

        // Restarted while the registry is still down: the memory was kept.
        let restarted = try await TestProxy(upstreamsYAML: upstreamYAML(registry), folder: folder, extraYAML: timeouts)
        let (again, againOutput) = try pull(restarted, "test/app:v1")
        XCTAssertEqual(again.map(Self.sha256), second.manifest, againOutput)
        let (againDigest, againDigestOutput) = try pull(restarted, "test/app@\(first.manifest)")
        XCTAssertEqual(againDigest.map(Self.sha256), first.manifest, againDigestOutput)
        XCTAssertGreaterThanOrEqual(try restarted.metric("cacheproxy_manifest_offline_total"), 2)
        await restarted.stop()

        // `offline: deny`: the same folder serves nothing without the upstream.
        let denying = try await TestProxy(upstreamsYAML: upstreamYAML(registry, ", offline: deny"), folder: folder,
                                          extraYAML: timeouts)
        let (denied, _) = try pull(denying, "test/app:v1")
        XCTAssertNil(denied)
        XCTAssertEqual(try curl("\(denying.base)/v2/test/app/manifests/v1").code, 502)
        XCTAssertEqual(try curl("\(denying.base)/v2/test/app/manifests/\(first.manifest)").code, 502)
        await denying.stop()
    }

    func testACachedManifestGoesOnlyToClientsTheRegistryAllows() async throws {
        let registry = try Registry(users: ["alice": "wonderland"])
        let image = try TestImage.make(layerSizes: [2048])
        try image.push(to: "\(registry.address)/private/app:v1", credentials: "alice:wonderland")
        let proxy = try await TestProxy(upstreamsYAML: upstreamYAML(registry))
        let (pulled, output) = try pull(proxy, "private/app:v1", creds: "alice:wonderland")
        XCTAssertEqual(pulled.map(Self.sha256), image.manifest, output)

        for reference in ["v1", image.manifest] {
            let url = "\(proxy.base)/v2/private/app/manifests/\(reference)"
            let stranger = try curl(url)
            XCTAssertEqual(stranger.code, 401, "anonymous, \(reference)")
            XCTAssertNotNil(stranger.headers["www-authenticate"], "the challenge is passed on")
            XCTAssertNotEqual(Self.sha256(stranger.body), image.manifest, "no manifest bytes for a stranger")
            let wrong = try curl(url, extra: ["-u", "alice:guess"])
            XCTAssertEqual(wrong.code, 401, "wrong password, \(reference)")
            let alice = try curl(url, extra: ["-u", "alice:wonderland",
                                              "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            XCTAssertEqual(alice.code, 200, "alice, \(reference)")
            XCTAssertEqual(Self.sha256(alice.body), image.manifest)
        }
        try await Task.sleep(for: .milliseconds(1200))
        XCTAssertEqual(registry.requests("GET", "/manifests/"), 1, "alice's later reads came from the cache")
        await proxy.stop()
        registry.stop()
    }

    /// A fake upstream with one image manifest: `rateLimited` makes every
    /// manifest request a 429, `corrupt` sends other bytes for the digest.
    final class FakeRegistry: @unchecked Sendable {
        let manifest = Data(#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.utf8)
        var digest: String { ManifestCacheTests.sha256(manifest) }
        let rateLimited = NIOLockedValueBox(false)
        let corrupt = NIOLockedValueBox(false)
        /// A tag's `HEAD` never answered.
        let silentHead = NIOLockedValueBox(false)
        /// A manifest `GET` stops after its first bytes for 3 s.
        let stallBody = NIOLockedValueBox(false)

        func reply(_ head: HTTPRequestHead) -> FakeUpstream.Reply {
            let type = "application/vnd.oci.image.manifest.v1+json"
            guard head.uri.contains("/manifests/") else { return .init(body: Array("{}".utf8)) }
            if head.method == .HEAD, silentHead.withLockedValue({ $0 }) { return .init(silent: true) }
            if head.method == .GET, stallBody.withLockedValue({ $0 }) {
                return .init(headers: ["content-type": type, "docker-content-digest": digest], body: Array(manifest),
                             chunkSize: 40, stallAfter: 40, stallFor: .seconds(3))
            }
            if rateLimited.withLockedValue({ $0 }) {
                return .init(status: .tooManyRequests, headers: ["ratelimit-remaining": "0;w=21600"])
            }
            var body = Array(manifest)
            if corrupt.withLockedValue({ $0 }) { body[body.count - 2] = UInt8(ascii: " ") }
            // A GET takes a while: requests that come meanwhile must join it.
            return .init(headers: ["content-type": type, "docker-content-digest": digest], body: body,
                         headDelay: head.method == .GET ? .milliseconds(300) : .zero)
        }
    }

    func testARateLimitedUpstreamStillGetsTheCachedManifest() async throws {
        let fake = FakeRegistry()
        let upstream = try await FakeUpstream { fake.reply($0) }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/manifests/latest").body, fake.manifest)
        fake.rateLimited.withLockedValue { $0 = true }
        for reference in ["latest", fake.digest] {
            let r = try curl("\(proxy.base)/v2/lib/app/manifests/\(reference)")
            XCTAssertEqual(r.code, 200, reference)
            XCTAssertEqual(r.body, fake.manifest, reference)
            XCTAssertEqual(r.headers["content-type"], "application/vnd.oci.image.manifest.v1+json")
            XCTAssertEqual(r.headers["docker-content-digest"], fake.digest)
        }
        let gets = upstream.requests.filter { $0.method == .GET && $0.uri.contains("/manifests/") }.count
        XCTAssertEqual(gets, 1, "one manifest GET: the rest were HEADs")
        // An image never seen gets the upstream's 429, its headers included.
        let unseen = try curl("\(proxy.base)/v2/lib/other/manifests/latest")
        XCTAssertEqual(unseen.code, 429)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_ratelimit_remaining{upstream="127.0.0.1"}"#), 0)
        await proxy.stop()
        await upstream.stop()
    }

    func testClientsAskingAtOnceForAnUncachedManifestMakeOneUpstreamGet() async throws {
        let fake = FakeRegistry()
        let upstream = try await FakeUpstream { fake.reply($0) }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        let byTag = try curlAtOnce("\(proxy.base)/v2/lib/app/manifests/latest", count: 6)
        let byDigest = try curlAtOnce("\(proxy.base)/v2/lib/app/manifests/\(fake.digest)", count: 6)
        for result in byTag + byDigest {
            XCTAssertEqual(result.code, 200)
            XCTAssertEqual(result.body, fake.manifest)
        }
        let gets = upstream.requests.filter { $0.method == .GET && $0.uri.contains("/manifests/") }.count
        XCTAssertEqual(gets, 1, "one upstream GET for twelve clients")
        await proxy.stop()
        await upstream.stop()
    }

    /// What the upstream says ends what the offline memory holds: a 404 of
    /// the digest as a *blob* does not unlink the manifest, and a
    /// credential refused a tag is not served it at the next outage.
    func testRefusalsReachTheOfflineMemoryAndOnlyForTheirOwnKind() async throws {
        enum Mode { case up, revoked, down }
        let mode = NIOLockedValueBox(Mode.up)
        let fake = FakeRegistry()
        let good = "Basic " + Data("good:pass".utf8).base64EncodedString()
        let upstream = try await FakeUpstream { head in
            let now = mode.withLockedValue { $0 }
            if now == .down { return .init(status: .serviceUnavailable) }
            if head.uri.contains("/blobs/") { return .init(status: .notFound) }
            guard head.uri.contains("/manifests/") else { return .init(body: Array("{}".utf8)) }
            guard now == .up, head.headers.first(name: "authorization") == good else {
                return .init(status: .unauthorized, headers: ["www-authenticate": #"Basic realm="fake""#])
            }
            return fake.reply(head)
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        let tag = "\(proxy.base)/v2/lib/app/manifests/latest"
        XCTAssertEqual(try curl(tag, extra: ["-u", "good:pass"]).body, fake.manifest)
        // The manifest's digest asked for as a blob: the registry says 404
        // for that path, which says nothing of the manifest.
        XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/blobs/\(fake.digest)", extra: ["-u", "good:pass"]).code, 404)
        mode.withLockedValue { $0 = .down }
        XCTAssertEqual(try curl(tag, extra: ["-u", "good:pass"]).body, fake.manifest, "still linked: served offline")
        XCTAssertEqual(try curl(tag).code, 503, "a stranger gets the upstream's failure")
        // The credential is revoked, then the upstream goes down again.
        mode.withLockedValue { $0 = .revoked }
        XCTAssertEqual(try curl(tag, extra: ["-u", "good:pass"]).code, 401)
        mode.withLockedValue { $0 = .down }
        XCTAssertEqual(try curl(tag, extra: ["-u", "good:pass"]).code, 503, "a revoked credential is not served offline")
        await proxy.stop()
        await upstream.stop()
    }

    /// registry.k8s.io sends every manifest request elsewhere: a client
    /// gets that redirect to follow, even for a digest cached earlier.
    func testAManifestRedirectReachesTheClient() async throws {
        let fake = FakeRegistry()
        let redirecting = NIOLockedValueBox(false)
        let upstream = try await FakeUpstream { head in
            guard redirecting.withLockedValue({ $0 }), head.uri.contains("/manifests/") else { return fake.reply(head) }
            return .init(status: .temporaryRedirect, headers: ["location": "https://elsewhere.invalid\(head.uri)"])
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        let url = "\(proxy.base)/v2/lib/app/manifests/\(fake.digest)"
        XCTAssertEqual(try curl(url, extra: ["-u", "a:a"]).body, fake.manifest)
        redirecting.withLockedValue { $0 = true }
        for reference in [fake.digest, "latest"] {
            let other = try curl("\(proxy.base)/v2/lib/app/manifests/\(reference)", extra: ["-u", "b:b"])
            XCTAssertEqual(other.code, 307, reference)
            XCTAssertEqual(other.headers["location"], "https://elsewhere.invalid/v2/lib/app/manifests/\(reference)")
        }
        await proxy.stop()
        await upstream.stop()
    }

    func testTheOfflineTableAnswersEachClientWithATypeItTakesIndexesFirst() throws {
        let table = TagTable()
        let key = TagTable.Key(upstream: "u", repository: "lib/app", tag: "v1")
        let index = try TagTable.Entry(digest: Digest(parsing: "sha256:" + String(repeating: "1", count: 64)),
                                       mediaType: XCTUnwrap(MediaType("application/vnd.oci.image.index.v1+json")))
        let single = try TagTable.Entry(digest: Digest(parsing: "sha256:" + String(repeating: "2", count: 64)),
                                        mediaType: XCTUnwrap(MediaType("application/vnd.docker.distribution.manifest.v2+json")))
        table.record(key, digest: index.digest, mediaType: index.mediaType)
        table.record(key, digest: single.digest, mediaType: single.mediaType)  // an old client's HEAD, later
        let containerd = ["application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, */*"]
        XCTAssertEqual(table.candidates(key, accept: containerd).first, index, "the index, though named earlier")
        XCTAssertEqual(table.candidates(key, accept: ["application/vnd.docker.distribution.manifest.v2+json"]).first, single)
        XCTAssertEqual(table.candidates(key, accept: ["application/vnd.oci.image.index.v1+json;q=0, */*"]).first, single)
        XCTAssertNil(table.candidates(key, accept: ["application/vnd.docker.distribution.manifest.v1+prettyjws"]).first)
        XCTAssertEqual(table.candidates(key, accept: []).first, index)
        // What a pull by tag expects is the first candidate of the types
        // its client names itself: a wildcard takes any type, but a
        // registry serves an index or a list only to a client naming it.
        // The same both ways of reading `Accept` (fields, or the bytes).
        let named: [([String], TagTable.Entry?)] = [
            (containerd, index), (["application/vnd.docker.distribution.manifest.v2+json"], single),
            (["application/vnd.oci.image.index.v1+json;q=0, */*"], nil),
            (["application/vnd.oci.image.index.v1+json;Q=0.000, application/vnd.docker.distribution.manifest.v2+json"], single),
            (["application/vnd.docker.distribution.manifest.v1+prettyjws"], nil), (["application/*"], nil),
            (["*/*"], nil), ([""], nil), ([], nil), ([" \tAPPLICATION/vnd.oci.image.index.v1+json ; q=0.5"], index),
        ]
        for (accept, expected) in named {
            XCTAssertEqual(table.expected(key) { $0.isNamed(by: accept) }, expected, "\(accept)")
            guard var field = accept.first else { continue }
            XCTAssertEqual(field.withUTF8 { raw in table.expected(key) { $0.isNamed(byField: UnsafeRawBufferPointer(raw)) } },
                           expected, "\(accept)")
        }
        XCTAssertNil(table.expected(TagTable.Key(upstream: "u", repository: "lib/app", tag: "v2")) { _ in true })
        // Clients taking turns with the same digests are no news to write.
        XCTAssertNotNil(table.snapshot())
        table.record(key, digest: index.digest, mediaType: index.mediaType)
        table.record(key, digest: single.digest, mediaType: single.mediaType)
        XCTAssertNil(table.snapshot())
        XCTAssertEqual(table.candidates(key, accept: containerd), [index, single], "the next when one cannot be served")
        // A 200 naming another type than the one a pull expected (the tag
        // moved from an index to a single manifest): the index is gone.
        let copy = TagTable(remembered: table.snapshot(always: true) ?? [])
        let moved = try Digest(parsing: "sha256:" + String(repeating: "4", count: 64))
        copy.record(key, digest: moved, mediaType: single.mediaType, superseding: index)
        XCTAssertEqual(copy.expected(key) { $0.isNamed(by: containerd) }?.digest, moved)
        XCTAssertEqual(copy.candidates(key, accept: containerd).map(\.digest), [moved])
        // A manifest expected before any index was known, and a client
        // naming both given the index: the manifest is still what clients
        // that name no index get, and stays.
        let fresh = TagTable()
        fresh.record(key, digest: single.digest, mediaType: single.mediaType)
        fresh.record(key, digest: index.digest, mediaType: index.mediaType, superseding: single)
        XCTAssertEqual(fresh.candidates(key, accept: containerd), [index, single])
        // Expected and named again: nothing changes.
        XCTAssertNotNil(copy.snapshot(), "the move is news")
        copy.record(key, digest: moved, mediaType: single.mediaType, superseding: copy.expected(key) { _ in true })
        XCTAssertNil(copy.snapshot(), "a renewal is no news")
        // A 404 to a client that takes only one type ends only that type.
        table.remove(key, accept: ["application/vnd.docker.distribution.manifest.v2+json"])
        XCTAssertEqual(table.candidates(key, accept: containerd), [index])
    }

    /// Slower than each timeout on the manifest path: a tag's `HEAD` silent
    /// past `timeouts.upstream` is answered from the offline table; a
    /// manifest body stalled past `upstream_idle` is cut and not stored.
    func testAManifestPathSlowerThanItsTimeouts() async throws {
        let fake = FakeRegistry()
        let upstream = try await FakeUpstream { fake.reply($0) }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
                                        extraYAML: "timeouts: {upstream: 1, upstream_idle: 1}")
        XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/manifests/latest").body, fake.manifest)
        fake.silentHead.withLockedValue { $0 = true }
        let started = Date()
        let offline = try curl("\(proxy.base)/v2/lib/app/manifests/latest")
        XCTAssertEqual(offline.code, 200)
        XCTAssertEqual(offline.body, fake.manifest)
        XCTAssertLessThan(Date().timeIntervalSince(started), 3, "one answer wait, then the offline table")
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 1)

        await proxy.stop()

        // A proxy with nothing cached, a manifest body that stalls.
        fake.silentHead.withLockedValue { $0 = false }
        fake.stallBody.withLockedValue { $0 = true }
        let fresh = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}",
                                        extraYAML: "timeouts: {upstream: 1, upstream_idle: 1}")
        let stalled = try curl("\(fresh.base)/v2/lib/app/manifests/\(fake.digest)")
        XCTAssertNotEqual(stalled.body, fake.manifest, "never a complete answer from a stalled body")
        XCTAssertEqual(fresh.files(in: "blobs"), [], "nothing stored")
        await fresh.stop()
        await upstream.stop()
    }

    func testAManifestThatDoesNotMatchItsDigestIsNeverStoredNorAnsweredWhole() async throws {
        let fake = FakeRegistry()
        fake.corrupt.withLockedValue { $0 = true }
        let upstream = try await FakeUpstream { fake.reply($0) }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\"}")
        for reference in ["latest", fake.digest] {
            let r = try curl("\(proxy.base)/v2/lib/app/manifests/\(reference)")
            XCTAssertNotEqual(r.body.count, fake.manifest.count, "\(reference): never a complete-looking answer")
            XCTAssertTrue(r.code != 200 || r.exitCode != 0, "\(reference): an error or a cut")
        }
        XCTAssertEqual(proxy.files(in: "blobs"), [], "nothing stored")
        XCTAssertEqual(try proxy.metric("cacheproxy_digest_mismatches_total"), 2)
        // Once the upstream is right again, the manifest is fetched anew.
        fake.corrupt.withLockedValue { $0 = false }
        XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/manifests/latest").body, fake.manifest)
        await proxy.stop()
        await upstream.stop()
    }
}

/// The offline memory's tables under a flood: bounded, and what they
/// answer never wrong.
final class OfflineTablesUnderFloodTests: XCTestCase {
    func testAFloodOfNewTagsStaysWithinTheBound() throws {
        let table = TagTable(capacity: 8)
        let type = try XCTUnwrap(MediaType("application/vnd.oci.image.manifest.v1+json"))
        func digest(_ n: Int) throws -> CacheProxy.Digest {
            try CacheProxy.Digest(parsing: "sha256:" + String(String(repeating: "0", count: 64 - String(n).count) + String(n)))
        }
        for n in 0..<200 {
            table.record(.init(upstream: n % 2 == 0 ? "a" : "b", repository: "flood/r", tag: "t\(n)"),
                         digest: try digest(n), mediaType: type)
        }
        let rows = try XCTUnwrap(table.snapshot())
        XCTAssertLessThanOrEqual(rows.count, 8, "bounded")
        for row in rows {
            let n = Int(row.key.tag.dropFirst()) ?? -1
            XCTAssertEqual(row.entries.first?.digest, try digest(n), "each kept tag still names its own digest")
        }
        let last = TagTable.Key(upstream: "b", repository: "flood/r", tag: "t199")
        XCTAssertEqual(table.candidates(last, accept: []).first?.digest, try digest(199), "the newest is kept")
    }

    /// What the upstream sends as a manifest's type is kept only as a
    /// plain token, trimmed of blanks: it goes back out as a header.
    func testAMediaTypeIsAPlainTokenTrimmed() {
        let type = "application/vnd.oci.image.manifest.v1+json"
        XCTAssertEqual(MediaType(type)?.value, type)
        XCTAssertEqual(MediaType(" \t\(type); charset=utf-8 \t")?.value, "\(type); charset=utf-8")
        for bad in ["", " \t ", "json", "application/json\r\nx-evil: 1", "a/b\u{7f}", "a/\u{e9}",
                    "a/" + String(repeating: "b", count: 254), ";/", " ;a/b", "json; a/b"] {
            XCTAssertNil(MediaType(bad), bad)
        }
        XCTAssertEqual(MediaType(" \tApplication/JSON ;q=1")?.essence, "application/json")
        XCTAssertNotNil(MediaType("a/" + String(repeating: "b", count: 253)), "255 bytes is the limit")
    }

    func testAHostileChallengeIsNotRemembered() {
        let pings = PingMemory()
        pings.record(upstream: "u", status: .unauthorized,
                     headers: ["www-authenticate": "Basic realm=\"" + String(repeating: "x", count: 5000) + "\""])
        XCTAssertNil(pings.answer(upstream: "u", headers: [:]), "too long to replay")
        pings.record(upstream: "u", status: .unauthorized, headers: ["www-authenticate": "Basic realm=\"a\u{7f}b\""])
        XCTAssertNil(pings.answer(upstream: "u", headers: [:]), "not a clean header value")
        pings.record(upstream: "u", status: .unauthorized, headers: ["www-authenticate": "Basic realm=\"r\""])
        XCTAssertEqual(pings.answer(upstream: "u", headers: [:])?.1.first(name: "www-authenticate"), "Basic realm=\"r\"")
    }
}
