import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import NIOSSL
import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import CacheProxy

/// A tag resolved on the event loop (`TagLookup`, `LoopUpstreamPool`): one
/// upstream `HEAD` per request on kept-alive connections, whatever the
/// answer, and the same answers as the async side gives.
final class TagLookupTests: XCTestCase {
    typealias Machine = UpstreamExchangeStateMachine

    /// The head `text` parses to.
    static func answer(_ text: String) -> UpstreamAnswerHead {
        guard case .head(let head, _) = UpstreamAnswerHead.parse(ByteBuffer(string: text), limit: 4096) else {
            preconditionFailure("not a head: \(text.debugDescription)")
        }
        return head
    }

    /// The exchange's transitions: a failure before any answer is marked so
    /// (the pool may retry it), one after the head is not.
    func testTheExchangeStateMachine() {
        var machine = Machine()
        XCTAssertEqual(machine.request(), .send)
        XCTAssertEqual(machine.request(), .fail(.busy, beforeAnswer: true), "one request at a time")
        let head = Self.answer("HTTP/1.1 200 OK\r\n\r\n")
        XCTAssertEqual(machine.receivedHead(head), .none)
        XCTAssertEqual(machine.receivedEnd(), .succeed(head, reusable: true))
        XCTAssertEqual(machine.state, .idle)
        // `Connection: close` and HTTP/1.0 without keep-alive end the connection.
        let closing = Self.answer("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        XCTAssertEqual(machine.request(), .send)
        _ = machine.receivedHead(closing)
        XCTAssertEqual(machine.receivedEnd(), .succeed(closing, reusable: false))
        XCTAssertEqual(machine.state, .closed)
        XCTAssertEqual(machine.request(), .fail(.busy, beforeAnswer: true), "never reused once closed")

        var idle = Machine()
        XCTAssertEqual(idle.closed(), .close, "closed between requests: nothing to fail")
        var waiting = Machine()
        _ = waiting.request()
        XCTAssertEqual(waiting.closed(), .fail(.closed, beforeAnswer: true), "the one retried")
        var reset = Machine()
        _ = reset.request()
        XCTAssertEqual(reset.failed(transport: true), .fail(.closed, beforeAnswer: true), "a reset is a close")
        var garbled = Machine()
        _ = garbled.request()
        XCTAssertEqual(garbled.failed(transport: false), .fail(.malformed, beforeAnswer: true))
        var cut = Machine()
        _ = cut.request()
        _ = cut.receivedHead(head)
        XCTAssertEqual(cut.closed(), .fail(.cut, beforeAnswer: false), "closed after the head: not retried")
        var answering = Machine()
        _ = answering.request()
        _ = answering.receivedHead(head)
        XCTAssertEqual(answering.timedOut(), .fail(.timedOut, beforeAnswer: false))
        var unasked = Machine()
        XCTAssertEqual(unasked.receivedHead(head), .close, "an answer nobody asked for closes")
    }

    /// The upstream's answer head, read as bytes: what a registry sends is
    /// taken whole at any cut, and what llhttp refused is refused.
    func testTheAnswerHeadIsReadStrictly() {
        func parse(_ text: String, limit: Int = 4096) -> UpstreamAnswerHead.Parsed {
            UpstreamAnswerHead.parse(ByteBuffer(string: text), limit: limit)
        }
        let text = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
            + "Docker-Content-Digest:sha256:ab \t\r\nX-Two: a\r\nx-two: b, c\r\nX-Empty:\r\nX-Obs: caf\u{e9}\r\n\r\n"
        guard case .head(let head, let length) = parse(text + "HTTP/1.1 404") else {
            return XCTFail("\(parse(text))")
        }
        XCTAssertEqual(length, text.utf8.count, "ends at the blank line")
        XCTAssertEqual(head.status, .ok)
        XCTAssertEqual(head.version, .http1_1)
        XCTAssertTrue(head.isKeepAlive)
        XCTAssertEqual(head.headers.first(name: "docker-content-digest"), "sha256:ab", "trimmed both sides")
        XCTAssertEqual(head.headers["x-two"], ["a", "b, c"], "repeated fields kept apart, values whole")
        XCTAssertEqual(head.headers.first(name: "x-empty"), "")
        XCTAssertEqual(head.headers.first(name: "x-obs"), "caf\u{e9}")
        // Looked up in the bytes, as the loop reads them: the first field
        // of that name, any case, trimmed.
        XCTAssertEqual(head.first(name: "docker-content-digest"), "sha256:ab")
        XCTAssertEqual(head.first(name: "x-two"), "a")
        XCTAssertEqual(head.first(name: "x-empty"), "")
        XCTAssertNil(head.first(name: "x-tw"))
        XCTAssertEqual(head.headers.count, 6)
        // Keep-alive as NIO reads it, from every `Connection` token.
        let keepAlive = [
            ("HTTP/1.1 200 OK\r\nConnection: Upgrade, CLOSE\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nconnection:close \r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nX-Connection: close\r\nConnection: closed\r\n\r\n", true),
            ("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n", true),
            ("HTTP/1.0 200 OK\r\nConnection: ,keep-alive,\r\n\r\n", true),
            ("HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\n\r\n", false),
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\n\r\n", false),
            ("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nConnection: Keep-Alive\r\n\r\n", false),
            ("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n", true),
        ]
        for (text, expected) in keepAlive {
            let answer = Self.answer(text)
            XCTAssertEqual(answer.isKeepAlive, expected, text.debugDescription)
            XCTAssertEqual(HTTPResponseHead(version: answer.version, status: answer.status, headers: answer.headers)
                .isKeepAlive, expected, "NIO reads \(text.debugDescription) the same way")
        }
        // Names are kept as sent, byte for byte, the common long ones
        // (held as literals, no allocation) as much as any other.
        let names = "HTTP/1.1 200 OK\r\nDocker-Content-Digest: a\r\nDOCKER-CONTENT-DIGEST: b\r\n"
            + "docker-content-digest: c\r\nDocker-Content-Digesx: d\r\nX-Content-Type-Options: e\r\n\r\n"
        guard case .head(let named, _) = parse(names) else { return XCTFail("\(parse(names))") }
        XCTAssertEqual(named.headers.map(\.name), ["Docker-Content-Digest", "DOCKER-CONTENT-DIGEST", "docker-content-digest",
                                                  "Docker-Content-Digesx", "X-Content-Type-Options"])
        XCTAssertEqual(named.headers["docker-content-digest"], ["a", "b", "c"])
        // The fields found on the parse's own walk are the ones a look-up
        // by name finds: the first of the name, any case, trimmed.
        XCTAssertEqual(named.digestField, "a")
        XCTAssertNil(named.contentType, "X-Content-Type-Options is not Content-Type")
        XCTAssertEqual(head.digestField, head.first(name: "docker-content-digest"))
        XCTAssertEqual(head.contentType, "application/vnd.oci.image.manifest.v1+json")
        XCTAssertNil(head.rateLimitRemaining)
        let limited = Self.answer("HTTP/1.1 200 OK\r\nRATELIMIT-REMAINING:\t 99;w=21600 \r\n"
            + "Content-Type:  a/b  \r\nratelimit-remaining: 1\r\nDocker-Content-Digest:\r\n\r\n")
        XCTAssertEqual(limited.rateLimitRemaining, "99;w=21600")
        XCTAssertEqual(limited.contentType, "a/b")
        XCTAssertEqual(limited.digestField, "", "present and empty, as first(name:) says")
        XCTAssertEqual(limited.digestField, limited.first(name: "docker-content-digest"))
        for cut in 0..<text.utf8.count {
            XCTAssertEqual(parse(String(decoding: Array(text.utf8)[..<cut], as: UTF8.self)), .incomplete, "cut at \(cut)")
        }
        guard case .head(let old, _) = parse("HTTP/1.0 404\r\n\r\n") else { return XCTFail("no reason phrase") }
        XCTAssertEqual(old.status, .notFound)
        XCTAssertFalse(old.isKeepAlive, "HTTP/1.0 closes unless it says keep-alive")
        let refused = [
            "HTTP/2 200\r\n\r\n", "HTTP/1.2 200 OK\r\n\r\n", "http/1.1 200 OK\r\n\r\n", "HTTP/1.1 20x OK\r\n\r\n",
            "HTTP/1.1 099 X\r\n\r\n", "HTTP/1.1  200 OK\r\n\r\n", "HTTP/1.1 200 OK\n\n", "HTTP/1.1 200 OK\r\nA: b\n\r\n",
            "HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n", "HTTP/1.1 200 OK\r\nA : b\r\n\r\n",
            "HTTP/1.1 200 OK\r\n: b\r\n\r\n", "HTTP/1.1 200 OK\r\nA: b\u{1}c\r\n\r\n", "HTTP/1.1 200 OK\r\nA\r\n\r\n",
            "HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n", "<html>",
            // Cut short of a status line, yet ended: `make fuzz`'s
            // answer-head found the first waited on as incomplete; the rest
            // end the same way at each later place of the line.
            "HTTP/1.\r\n\r\n", "HTTP/1.1\r\n\r\n", "HTTP/1.1 2\r\n\r\n", "HTTP/1.1 20\r\n",
        ]
        for bad in refused { XCTAssertEqual(parse(bad), .malformed, bad.debugDescription) }
        XCTAssertEqual(parse("HTTP/1.1 200 OK\r\nA: \(String(repeating: "b", count: 100))\r\n\r\n", limit: 64),
                       .malformed, "past the limit")

        var out = ByteBuffer()
        XCTAssertTrue(UpstreamAnswerHead.writeRequest(uri: "/v2/a/manifests/1", headers: ["accept": "*/*"], into: &out))
        XCTAssertEqual(String(buffer: out), "HEAD /v2/a/manifests/1 HTTP/1.1\r\naccept: */*\r\n\r\n")
        var none = ByteBuffer()
        XCTAssertFalse(UpstreamAnswerHead.writeRequest(uri: "/v2/a", headers: ["x": "a\r\nInjected: 1"], into: &none))
        XCTAssertFalse(UpstreamAnswerHead.writeRequest(uri: "/v2/a HTTP/1.0\r\n", headers: [:], into: &none))
        XCTAssertEqual(none.readableBytes, 0)
    }

    /// The `HEAD` written straight from a request's bytes carries what the
    /// decoder's way writes for the same request (NIO's decoder, then
    /// `BlobResponder.upstreamHeaders` and `writeRequest`): the same request
    /// line and field lines, byte for byte (the order differs: `host` comes
    /// first from the bytes, last the other way); the default `Accept` when
    /// the client sent none.
    func testTheHeadFromTheBytesIsTheDecodersHead() throws {
        let router = Router(upstreams: [.init(host: "h", registry: "r", port: 5000, schema: "https", aliases: [])])
        func lines(_ request: ByteBuffer) -> (line: Substring, fields: [Substring]) {
            let lines = String(buffer: request).split(separator: "\r\n", omittingEmptySubsequences: false)
            XCTAssertEqual(lines.suffix(2), ["", ""], "ends with a blank line")
            return (lines[0], lines.dropFirst().dropLast(2).sorted())
        }
        let heads = [
            "GET /v2/lib/app/manifests/v1.2 HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /v2/lib/app/manifests/latest HTTP/1.1\r\nHost: h\r\nAccept: application/vnd.oci.image.index.v1+json, */* \r\n"
                + "User-Agent: containerd/2.0 (x)\t\r\nAuthorization: Bearer a,b \r\nX-Other: 1\r\n\r\n",
            "GET /v2/lib/app/manifests/latest?ns=h HTTP/1.1\r\nHost: h\r\nauthorization:Basic eA==\r\nACCEPT:\t*/*\r\n\r\n",
        ]
        // With a manifest remembered for both tags, each way names it in
        // `If-None-Match`, when the client names its type (or names none:
        // it is asked for with the default `Accept`, which does).
        let remembered = TagTable()
        let index = try Digest(parsing: "sha256:" + String(repeating: "1", count: 64))
        for tag in ["v1.2", "latest"] {
            remembered.record(TagTable.Key(upstream: "h", repository: "lib/app", tag: tag), digest: index,
                              mediaType: try XCTUnwrap(MediaType("application/vnd.oci.image.index.v1+json")))
        }
        let refusing = "GET /v2/lib/app/manifests/latest HTTP/1.1\r\nHost: h\r\n"
            + "Accept: application/vnd.oci.image.index.v1+json;q=0, */*\r\n\r\n"
        for (text, tags) in heads.map({ ($0, nil) }) + (heads + [refusing]).map({ ($0, remembered) }) {
            let bytes = ByteBuffer(string: text)
            let plain = try XCTUnwrap(bytes.withUnsafeReadableBytes { PlainGetHead.parse($0, limit: 4096) }, text)
            let fromBytes = try XCTUnwrap(TagLookup(plain.head, bytes: bytes, router: router, tags: tags))
            let channel = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder()))
            try channel.writeInbound(bytes)
            guard case .head(let decoded)? = try channel.readInbound(as: HTTPServerRequestPart.self) else {
                return XCTFail("NIO read no head from \(text.debugDescription)")
            }
            let viaDecoder = try XCTUnwrap(TagLookup(decoded, router: router, tags: tags))
            let (bytesWay, decoderWay) = (lines(fromBytes.ask), lines(viaDecoder.ask))
            XCTAssertEqual(bytesWay.line, "HEAD \(decoded.uri.prefix { $0 != "?" }) HTTP/1.1")
            XCTAssertEqual(bytesWay.line, decoderWay.line)
            XCTAssertEqual(bytesWay.fields, decoderWay.fields, text.debugDescription)
            XCTAssertTrue(bytesWay.fields.contains { $0.hasPrefix("accept: ") }, "an Accept always")
            XCTAssertEqual(fromBytes.credentials["authorization"], viaDecoder.credentials["authorization"])
            XCTAssertEqual(fromBytes.key, viaDecoder.key)
            // `*/*` alone names no type: the registry would pick what to
            // serve, so nothing is expected (`MediaType.isNamed`).
            let expects = tags != nil && text != refusing && !text.hasSuffix("ACCEPT:\t*/*\r\n\r\n")
            XCTAssertEqual(bytesWay.fields.filter { $0.hasPrefix("if-none-match: ") },
                           expects ? ["if-none-match: \"\(index)\""] : [], text.debugDescription)
            XCTAssertEqual(fromBytes.expected?.digest, expects ? index : nil)
            XCTAssertEqual(viaDecoder.expected?.digest, expects ? index : nil)
        }
        // A client's `HEAD` is answered with the upstream's own headers,
        // which a 304 does not carry: it expects nothing.
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(HTTPRequestDecoder()))
        try channel.writeInbound(ByteBuffer(string: "HEAD /v2/lib/app/manifests/latest HTTP/1.1\r\nHost: h\r\n\r\n"))
        guard case .head(let head)? = try channel.readInbound(as: HTTPServerRequestPart.self) else {
            return XCTFail("NIO read no head")
        }
        let lookup = try XCTUnwrap(TagLookup(head, router: router, tags: remembered))
        XCTAssertNil(lookup.expected)
        XCTAssertFalse(String(buffer: lookup.ask).contains("if-none-match"))
    }

    /// The 304 below and above `timeouts.upstream` (1 s): one in time is
    /// answered from memory after it; one later is not waited for, and the
    /// offline table answers with the same manifest at the timeout.
    func testA304BelowAndAboveTheUpstreamTimeout() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let delay = NIOLockedValueBox(TimeAmount.zero)
        let upstream = try await FakeUpstream { head in
            if head.method == .HEAD, head.headers.first(name: "if-none-match") == "\"\(fake.digest)\"" {
                return .init(status: .notModified, headDelay: delay.withLockedValue { $0 })
            }
            return fake.reply(head)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        extraYAML: "timeouts: {upstream: 1}")
        let url = "\(proxy.base)/v2/lib/app/manifests/latest"
        let oci = ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"]
        XCTAssertEqual(try curl(url, oci).body, fake.manifest)
        delay.withLockedValue { $0 = .milliseconds(500) }
        var started = Date()
        XCTAssertEqual(try curl(url, oci).body, fake.manifest)
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 0.5, "after the 304")
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="304"}"#), 1)
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 0)
        delay.withLockedValue { $0 = .seconds(3) }
        started = Date()
        let late = try curl(url, oci)
        XCTAssertEqual(late.code, 200)
        XCTAssertEqual(late.body, fake.manifest)
        XCTAssertLessThan(Date().timeIntervalSince(started), 2.5, "the timeout, not the 304")
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// Clients naming different types pull one tag at once, against an
    /// upstream that negotiates as distribution does: the tag names a
    /// Docker manifest list, a client naming the list's type gets the list,
    /// any other (`*/*` alone, a schema-2 manifest only) the platform
    /// manifest the list is rewritten to; and `If-None-Match` is compared
    /// with the tag's digest before that negotiation. However the pulls
    /// interleave in the tag table, each client gets its own type every
    /// time, and the list's clients get it after 304s.
    func testClientsNamingDifferentTypesShareATagAndEachGetsItsOwn() async throws {
        let listType = "application/vnd.docker.distribution.manifest.list.v2+json"
        let manifestType = "application/vnd.docker.distribution.manifest.v2+json"
        let manifest = Data(#"{"schemaVersion":2,"mediaType":"\#(manifestType)","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.utf8)
        let manifestDigest = ManifestCacheTests.sha256(manifest)
        let list = Data(#"{"schemaVersion":2,"mediaType":"\#(listType)","manifests":[{"mediaType":"\#(manifestType)","digest":"\#(manifestDigest)","size":\#(manifest.count),"platform":{"architecture":"amd64","os":"linux"}}]}"#.utf8)
        let listDigest = ManifestCacheTests.sha256(list)
        let upstream = try await FakeUpstream { head in
            let answers = [listDigest: (list, listType), manifestDigest: (manifest, manifestType)]
            func answer(_ digest: String) -> FakeUpstream.Reply {
                let (body, type) = answers[digest] ?? (Data(), "")
                return .init(headers: ["content-type": type, "docker-content-digest": digest], body: Array(body))
            }
            if let digest = head.uri.split(separator: "/").last.map(String.init), answers[digest] != nil {
                return answer(digest)
            }
            guard head.uri == "/v2/lib/app/manifests/latest" else { return .init(status: .notFound) }
            if head.headers["if-none-match"].contains("\"\(listDigest)\"") { return .init(status: .notModified) }
            return answer(head.headers["accept"].contains { $0.contains(listType) } ? listDigest : manifestDigest)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        let clients: [(accept: String, expected: Data)] = [
            ("-H 'Accept: \(listType), \(manifestType)'", list), ("-H 'Accept: */*'", manifest),
            ("-H 'Accept: \(manifestType)'", manifest), ("-H 'Accept:'", list),  // none (curl's own `*/*` removed): the default names lists
        ]
        let folder = try makeTemporaryFolder("pulls")
        var script = ""
        for round in 0..<6 {
            for (index, client) in clients.enumerated() {
                script += "curl -s -o \(folder)/\(round)-\(index) \(client.accept) \(proxy.base)/v2/lib/app/manifests/latest &\n"
            }
        }
        let (status, output) = try shell("bash", ["-c", script + "wait"])
        XCTAssertEqual(status, 0, output)
        for round in 0..<6 {
            for (index, client) in clients.enumerated() {
                let body = try Data(contentsOf: URL(fileURLWithPath: "\(folder)/\(round)-\(index)"))
                XCTAssertEqual(body, client.expected, "round \(round), client \(client.accept)")
            }
        }
        // Then one at a time, once each: the table holds both by now.
        for client in clients {
            let (_, one) = try shell("bash", ["-c", "curl -s \(client.accept) \(proxy.base)/v2/lib/app/manifests/latest"])
            XCTAssertEqual(Data(one.utf8), client.expected, client.accept)
        }
        XCTAssertGreaterThanOrEqual(
            try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="304"}"#), 2)
        await proxy.stop()
        await upstream.stop()
    }

    /// A pull by tag names the manifest the tag named last in its `HEAD`'s
    /// `If-None-Match`; the upstream's 304 is then answered with that
    /// manifest, from memory, both ways (from the bytes, and through the
    /// decoder for a client with two `Accept` fields). Nothing is expected
    /// of a client that does not take the remembered type, nor of a
    /// `HEAD`; a 304 naming another digest is not believed: the request
    /// goes to the upstream as it came.
    func testATagPullExpectsItsLastManifestAndBelievesA304OnlyForIt() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let other = "sha256:" + String(repeating: "3", count: 64)
        let lying = NIOLockedValueBox(false)
        let upstream = try await FakeUpstream { head in
            if head.method == .HEAD, head.uri == "/v2/lib/app/manifests/latest",
               let expected = head.headers.first(name: "if-none-match") {
                if lying.withLockedValue({ $0 }) {
                    return .init(status: .notModified, headers: ["docker-content-digest": other])
                }
                if expected == "\"\(fake.digest)\"" { return .init(status: .notModified) }
            }
            return fake.reply(head)
        }
        let folder = try makeTemporaryFolder("cache")
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port), folder: folder)
        let url = "\(proxy.base)/v2/lib/app/manifests/latest"
        func heads() -> [FakeUpstream.Seen] {
            upstream.requests.filter { $0.method == .HEAD && $0.uri == "/v2/lib/app/manifests/latest" }
        }
        let oci = ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"]
        for accept in [oci, oci, oci, oci + ["-H", "Accept: */*"]] {
            let pull = try curl(url, accept)
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(pull.body, fake.manifest)
        }
        let (_, head) = try shell("curl", ["-s", "-D", "-", "-o", "/dev/null"] + oci + [url])
        XCTAssertTrue(head.lowercased().contains("docker-content-digest: \(fake.digest)"), head)
        XCTAssertTrue(head.lowercased().contains("content-type: application/vnd.oci.image.manifest.v1+json"), head)
        let expected = heads().map { $0.headers.first(name: "if-none-match") }
        XCTAssertEqual(expected, [nil] + Array(repeating: "\"\(fake.digest)\"", count: 4),
                       "nothing expected before the first answer, the last manifest after it")
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="304"}"#), 4)
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_tag_pulls_on_loop_total"), 3)
        XCTAssertEqual(upstream.gets.filter { $0.uri.contains("/manifests/") }.count, 1, "one fill, then 304s")

        // A client that does not take the type, and a HEAD: nothing expected.
        _ = try curl(url, ["-H", "Accept: application/vnd.docker.distribution.manifest.v1+prettyjws"])
        XCTAssertEqual(try curl(url, oci + ["-I"]).code, 200)
        XCTAssertEqual(heads().suffix(2).map { $0.headers.first(name: "if-none-match") }, [nil, nil])

        // A 304 that names another manifest: the client's GET goes on as it
        // came, and gets the upstream's own answer.
        lying.withLockedValue { $0 = true }
        let gets = upstream.gets.count
        let pull = try curl(url, oci)
        XCTAssertEqual(pull.code, 200)
        XCTAssertEqual(pull.body, fake.manifest)
        XCTAssertEqual(upstream.gets.count, gets + 1, "passed through, not answered from the 304")
        XCTAssertEqual(upstream.gets.last?.uri, "/v2/lib/app/manifests/latest")
        await proxy.stop()

        // Restarted: the tag is remembered, the manifest is on disk only.
        // The 304 goes to the async side as the 200 it stands for, which
        // serves the manifest from disk (no GET upstream).
        lying.withLockedValue { $0 = false }
        let restarted = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port), folder: folder)
        let getsBefore = upstream.gets.count
        let fromDisk = try curl("\(restarted.base)/v2/lib/app/manifests/latest", oci)
        XCTAssertEqual(fromDisk.code, 200)
        XCTAssertEqual(fromDisk.body, fake.manifest)
        XCTAssertEqual(heads().last?.headers.first(name: "if-none-match"), "\"\(fake.digest)\"")
        XCTAssertEqual(upstream.gets.count, getsBefore, "from the disk")
        XCTAssertEqual(try restarted.metric("cacheproxy_tag_pulls_on_loop_total"), 0, "handed to the async side")
        XCTAssertEqual(try restarted.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="304"}"#), 1)
        await restarted.stop()

        // The async side's own `HEAD` (an upstream with an account of the
        // proxy's, which the loop does not ask) expects the same way.
        let secret = try makeTemporaryFolder("secret") + "/password"
        try "p\n".write(toFile: secret, atomically: true, encoding: .utf8)
        let account = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: http,
                 username: u, password_file: "\(secret)"}
            """)
        let before = heads().count
        for _ in 0..<3 {
            let pull = try curl("\(account.base)/v2/lib/app/manifests/latest", oci)
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(pull.body, fake.manifest)
        }
        XCTAssertEqual(heads().dropFirst(before).map { $0.headers.first(name: "if-none-match") },
                       [nil] + Array(repeating: "\"\(fake.digest)\"", count: 2))
        XCTAssertEqual(try account.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="304"}"#), 2)
        XCTAssertEqual(try account.metric("cacheproxy_tag_pulls_on_loop_total"), 0, "the async side's own")
        await account.stop()
        await upstream.stop()
    }

    /// The exchange handler over those bytes: a head cut across reads, an
    /// interim answer before the real one, bytes after an answer (the
    /// connection is not kept) and bytes nobody asked for (closed).
    func testTheExchangeHandlerReadsAnswersAcrossReads() throws {
        func connected() throws -> (EmbeddedChannel, UpstreamExchangeHandler) {
            let channel = EmbeddedChannel()
            let handler = UpstreamExchangeHandler(eventLoop: channel.embeddedEventLoop)
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
            return (channel, handler)
        }
        let ask = ByteBuffer(string: "HEAD /v2/a/manifests/1 HTTP/1.1\r\nhost: r\r\n\r\n")
        let (channel, handler) = try connected()
        var answers: [UpstreamExchangeHandler.Answer] = []
        handler.ask(ask, within: .seconds(5)) { if case .success(let answer) = $0 { answers.append(answer) } }
        XCTAssertEqual(try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) },
                       "HEAD /v2/a/manifests/1 HTTP/1.1\r\nhost: r\r\n\r\n")
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nDocker-Con"))
        XCTAssertTrue(answers.isEmpty)
        try channel.writeInbound(ByteBuffer(string: "tent-Digest: sha256:ab\r\n\r\n"))
        XCTAssertEqual(answers.first?.head.status, .ok)
        XCTAssertEqual(answers.first?.head.headers.first(name: "docker-content-digest"), "sha256:ab")
        XCTAssertEqual(answers.first?.reusable, true)
        XCTAssertTrue(handler.isIdle)

        handler.ask(ask, within: .seconds(5)) { if case .success(let answer) = $0 { answers.append(answer) } }
        _ = try channel.readOutbound(as: ByteBuffer.self)
        try channel.writeInbound(ByteBuffer(string: "HTTP/1.1 404 Not Found\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"))
        XCTAssertEqual(answers.last?.head.status, .notFound)
        XCTAssertEqual(answers.last?.reusable, false, "an answer nobody asked for came after it")
        XCTAssertFalse(channel.isActive)

        let (idle, idleHandler) = try connected()
        try idle.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\n"))
        XCTAssertFalse(idle.isActive, "bytes while nothing was asked: out of step, closed")
        XCTAssertFalse(idleHandler.isIdle)

        let (garbled, garbledHandler) = try connected()
        var failure: (any Error)?
        garbledHandler.ask(ask, within: .seconds(5)) { if case .failure(let error) = $0 { failure = error } }
        try garbled.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\nA: b\n\r\n"))
        XCTAssertEqual(failure as? UpstreamExchangeStateMachine.Failure, .malformed)
        XCTAssertFalse(garbled.isActive)

        // A head dripped a byte at a time is read once it has ended.
        let (drip, dripHandler) = try connected()
        var dripped: [UpstreamExchangeHandler.Answer] = []
        dripHandler.ask(ask, within: .seconds(5)) { if case .success(let answer) = $0 { dripped.append(answer) } }
        for byte in "HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n".utf8 {
            XCTAssertTrue(dripped.isEmpty)
            try drip.writeInbound(ByteBuffer(bytes: [byte]))
        }
        XCTAssertEqual(dripped.first?.head.headers.first(name: "x-a"), "1")
        XCTAssertEqual(dripped.first?.reusable, true)

        // The answer deadline: one timer, re-armed for a later wait, not
        // one per exchange; each wait still ends at its own deadline.
        let (timed, timedHandler) = try connected()
        var outcomes: [String] = []
        let record: UpstreamExchangeHandler.Completion = { result in
            switch result {
            case .success(let answer): outcomes.append("\(answer.head.status.code)")
            case .failure(let error): outcomes.append("\(error)")
            }
        }
        timedHandler.ask(ask, within: .seconds(5), completion: record)
        timed.embeddedEventLoop.advanceTime(by: .seconds(2))
        try timed.writeInbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\n"))
        timedHandler.ask(ask, within: .seconds(5), completion: record)  // due at 7 s; the timer is at 5 s
        timed.embeddedEventLoop.advanceTime(by: .seconds(4))
        XCTAssertEqual(outcomes, ["200"], "not timed out at the first wait's deadline")
        timed.embeddedEventLoop.advanceTime(by: .milliseconds(999))
        XCTAssertEqual(outcomes, ["200"])
        timed.embeddedEventLoop.advanceTime(by: .milliseconds(2))
        XCTAssertEqual(outcomes, ["200", "timedOut"], "at its own deadline")
        XCTAssertFalse(timed.isActive)
    }

    /// Pulls by tag: each asks the upstream once (an answer handed to the
    /// async side is not asked again), on kept-alive connections; a refusal
    /// reaches the client as the upstream gave it, once.
    func testEachPullAsksOnceOnKeptAliveConnections() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { head in
            if head.uri.contains("/private/") {
                return .init(status: .unauthorized, headers: ["www-authenticate": #"Bearer realm="http://x/token""#])
            }
            return fake.reply(head)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        for _ in 0..<8 {
            let pull = try curl("\(proxy.base)/v2/lib/app/manifests/latest",
                                ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(pull.body, fake.manifest)
        }
        let heads = upstream.requests.filter { $0.method == .HEAD && $0.uri == "/v2/lib/app/manifests/latest" }
        XCTAssertEqual(heads.count, 8, "one upstream HEAD per pull")
        // The first pull's fill has its own connection; the HEADs share at
        // most one per event loop.
        XCTAssertLessThanOrEqual(upstream.connections, 4, "kept-alive, not a connection per pull")
        XCTAssertEqual(heads.last?.headers.first(name: "accept"), "application/vnd.oci.image.manifest.v1+json",
                       "the client's Accept")
        XCTAssertEqual(try proxy.metric(#"cacheproxy_time_to_first_byte_seconds_count{kind="manifest"}"#), 8,
                       "every pull timed to its first byte, on the loop or not")
        // All but the first two or three (the fill, the read into memory).
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_tag_pulls_on_loop_total"), 5)

        let refused = try curl("\(proxy.base)/v2/lib/private/manifests/latest", ["-I"])
        XCTAssertEqual(refused.code, 401)
        XCTAssertEqual(upstream.requests.filter { $0.uri.contains("/private/") }.count, 1,
                       "the refusal is handed on, not asked for again")
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="401"}"#), 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// A TLS upstream (the real registry, its certificate from the test's
    /// CA) is asked from the loop too, with its session's context: the
    /// loop's own pool gets the tag's answer over TLS, by address (checked
    /// against the certificate's IP entry) and by name (SNI, its DNS
    /// entry); a context that does not trust the CA gets a handshake
    /// failure, also for an upstream whose settings changed while a
    /// verified connection sat idle (never reused across contexts). Through
    /// the proxy, pulls by tag get the manifest and its digest, one upstream
    /// `HEAD` each.
    func testATLSUpstreamIsAskedFromTheLoopWithItsSettings() async throws {
        let certificates = try TestCertificates.make()
        let registry = try Registry(tls: certificates)
        let image = try TestImage.make(layerSizes: [10_000])
        try image.push(to: "\(registry.address)/team/app:v1")
        var upstream = ProxyConfig.Upstream(host: "127.0.0.1", registry: "127.0.0.1", port: registry.port,
                                            schema: "https", aliases: [])
        upstream.tls.caFile = certificates.caCert
        XCTAssertTrue(LoopUpstreamPool.serves(upstream))

        var trusting = TLSConfiguration.makeClientConfiguration()
        trusting.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(certificates.caCert))
        let withCA = UpstreamClient.LoopTLS(context: try NIOSSLContext(configuration: trusting), number: 1)
        let system = UpstreamClient.LoopTLS(
            context: try NIOSSLContext(configuration: .makeClientConfiguration()), number: 2)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let pool = LoopUpstreamPool(group: group, connectTimeout: .seconds(2)) { $0.tls.caFile == nil ? system : withCA }
        func ask(_ upstream: ProxyConfig.Upstream) async throws -> UpstreamAnswerHead {
            let head = ByteBuffer(string: "HEAD /v2/team/app/manifests/v1 HTTP/1.1\r\nhost: \(upstream.registry):\(upstream.port)"
                + "\r\naccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n")
            return try await loop.flatSubmit {
                let answer = loop.makePromise(of: UpstreamAnswerHead.self)
                if !pool.ask(head, to: upstream, on: loop, within: .seconds(5), completion: answer.completeWith) {
                    answer.fail(UpstreamExchangeStateMachine.Failure.busy)
                }
                return answer.futureResult
            }.get()
        }
        func refused(_ upstream: ProxyConfig.Upstream, _ why: String) async {
            do {
                let answer = try await ask(upstream)
                XCTFail("\(why): answered without a verified certificate: \(answer.status)")
            } catch {
                XCTAssertTrue(error is NIOSSLError, "\(why): a handshake failure, not \(error)")
            }
        }
        var byName = upstream
        byName.registry = "localhost"
        for target in [upstream, upstream, upstream, byName] {
            let answer = try await ask(target)
            XCTAssertEqual(answer.status, .ok, target.registry)
            XCTAssertEqual(answer.first(name: "docker-content-digest"), image.manifest)
        }
        var changed = upstream  // a verified connection to it is idle in the pool now
        changed.tls = .init()
        await refused(changed, "settings changed")
        var strict = changed
        strict.host = "strict"
        await refused(strict, "another upstream")
        try await group.shutdownGracefully()
        XCTAssertTrue(eventually { registry.requests("HEAD", "/manifests/v1") == 4 }, "the pool's four HEADs, logged")

        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: https, ca_file: \"\(certificates.caCert)\"}")
        let url = "\(proxy.base)/v2/team/app/manifests/v1"
        let accept = ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"]
        for _ in 0..<4 {
            let pull = try curl(url, accept)
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(TestImage.digest(pull.body), image.manifest)
        }
        let headers = try shell("curl", ["-sI", url] + accept).output.lowercased()
        XCTAssertTrue(headers.contains("docker-content-digest: \(image.manifest)"), headers)
        XCTAssertTrue(eventually { registry.requests("HEAD", "/manifests/v1") == 9 }, "one upstream HEAD per pull")
        // The first pulls fill the cache and read the manifest into memory
        // on the async side; the later GETs and the HEAD were the loop's,
        // over TLS.
        XCTAssertGreaterThanOrEqual(try proxy.metric("cacheproxy_tag_pulls_on_loop_total"), 2)
        await proxy.stop()
    }

    /// A TLS upstream that takes the connection and never answers the
    /// handshake is unreachable after the connect timeout (502, as the
    /// async side says of it), not silent until the answer's wait ends,
    /// for a tag's `HEAD` and for a blob fill's own connection alike; one
    /// that refuses the connection is unreachable at once.
    func testATLSHandshakeThatNeverEndsIsBoundByTheConnectTimeout() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let silent = try await ServerBootstrap(group: group).childChannelOption(.autoRead, value: false)
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try XCTUnwrap(silent.localAddress?.port)
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(port), schema: https}",
            extraYAML: "timeouts: {connect: 1, upstream: 6}")
        let started = Date()
        let pull = try curl("\(proxy.base)/v2/team/app/manifests/v1")
        let took = Date().timeIntervalSince(started)
        XCTAssertEqual(pull.code, 502, String(decoding: pull.body, as: UTF8.self))
        XCTAssertTrue(String(decoding: pull.body, as: UTF8.self).contains("UNAVAILABLE"))
        XCTAssertLessThan(took, 4, "the connect timeout (1 s), not the answer's (6 s)")
        let blobStarted = Date()
        let blob = try curl("\(proxy.base)/v2/team/app/blobs/sha256:\(String(repeating: "a", count: 64))")
        XCTAssertEqual(blob.code, 502, String(decoding: blob.body, as: UTF8.self))
        XCTAssertLessThan(Date().timeIntervalSince(blobStarted), 4, "a fill's handshake: the connect timeout too")
        await proxy.stop()
        try await silent.close()

        // One that refuses the connection: 502 at once. NIO closes a channel
        // whose connect failed without an event, only removing its handlers;
        // the handshake's promise is failed there (a debug build, as this
        // test runs, traps on a promise left unfulfilled).
        let closed = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let refusing = try XCTUnwrap(closed.localAddress?.port)
        try await closed.close()
        let again = try await TestProxy(
            upstreamsYAML: "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(refusing), schema: https}",
            extraYAML: "timeouts: {connect: 1, upstream: 6}")
        for _ in 0..<2 {
            let refused = try curl("\(again.base)/v2/team/app/manifests/v1")
            XCTAssertEqual(refused.code, 502, String(decoding: refused.body, as: UTF8.self))
        }
        await again.stop()
        try await group.shutdownGracefully()
    }

    /// An upstream that closes each connection after its answer, unsaid,
    /// or closes it when the next request comes (its keep-alive timeout
    /// met that request): every pull still gets the manifest from the
    /// upstream, asked again on a new connection, not the offline copy.
    func testAnUpstreamThatClosesKeptConnectionsIsAskedAgainOnANewOne() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let dropping = NIOLockedValueBox(false)
        let upstream = try await FakeUpstream { head in
            var reply = fake.reply(head)
            if dropping.withLockedValue({ $0 }) { reply.dropIfReused = true } else { reply.closeAfter = head.method == .HEAD }
            return reply
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        for attempt in 0..<10 {
            if attempt == 5 { dropping.withLockedValue { $0 = true } }
            let pull = try curl("\(proxy.base)/v2/lib/app/manifests/latest")
            XCTAssertEqual(pull.code, 200, "pull \(attempt)")
            XCTAssertEqual(pull.body, fake.manifest, "pull \(attempt)")
        }
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 0, "answered by the upstream each time")
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="0"}"#), 0)
        await proxy.stop()
        await upstream.stop()
    }

    /// Pipelined requests keep their order whichever side answers them: a
    /// tag answered on the loop, a refusal handed to the async side, a
    /// `HEAD` of the tag, and a client that leaves while the upstream is
    /// asked costs nobody else anything.
    func testPipelinedTagsKeepTheirOrderAndALeavingClientHarmsNoOne() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let slow = NIOLockedValueBox(false)
        let upstream = try await FakeUpstream { head in
            if head.uri.contains("/private/") { return .init(status: .unauthorized) }
            var reply = fake.reply(head)
            if slow.withLockedValue({ $0 }), head.method == .HEAD { reply.headDelay = .milliseconds(500) }
            return reply
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/manifests/latest").body, fake.manifest)

        let host = "Host: 127.0.0.1:\(proxy.port)\r\n"
        let (text, statuses, _) = try await pipelined(proxy,
            "GET /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)\r\n"
                + "GET /v2/lib/private/manifests/latest HTTP/1.1\r\n\(host)\r\n"
                + "HEAD /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)Connection: close\r\n\r\n")
        XCTAssertEqual(statuses, ["200", "401", "200"])
        XCTAssertTrue(text.contains(String(decoding: fake.manifest, as: UTF8.self)), "the body of the first")
        XCTAssertEqual(text.components(separatedBy: "docker-content-digest: \(fake.digest)").count - 1, 2)

        // A client that leaves while its tag is asked.
        slow.withLockedValue { $0 = true }
        let leaving = try RawSocket(port: proxy.port)
        XCTAssertTrue(leaving.send("GET /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)\r\n"))
        try await Task.sleep(for: .milliseconds(100))
        leaving.close()
        slow.withLockedValue { $0 = false }
        try await Task.sleep(for: .milliseconds(600))
        for _ in 0..<3 {
            let pull = try curl("\(proxy.base)/v2/lib/app/manifests/latest")
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(pull.body, fake.manifest)
        }
        // The scrape's own connection is the one left.
        XCTAssertTrue(try eventually { try proxy.metric("cacheproxy_connected_clients") == 1 }, "nothing left open")
        await proxy.stop()
        await upstream.stop()
    }

    /// An upstream slow to answer one tag (below the answer timeout) holds
    /// up neither the other clients' tags nor its own answer; above the
    /// timeout, the offline copy answers (ManifestCacheTests covers that).
    func testASlowTagStarvesNoOtherClient() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { head in
            var reply = fake.reply(head)
            if head.uri.contains("/slow/"), head.method == .HEAD { reply.headDelay = .milliseconds(1500) }
            return reply
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        extraYAML: "timeouts: {upstream: 2, upstream_idle: 2}")
        XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/manifests/latest").body, fake.manifest)
        // A socket, not a curl: a test thread blocked on a process would
        // starve the in-process proxy's own tasks, not the proxy.
        let slow = try RawSocket(port: proxy.port)
        XCTAssertTrue(slow.send("GET /v2/lib/slow/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1:\(proxy.port)\r\n"
                                + "Connection: close\r\n\r\n"))
        try await Task.sleep(for: .milliseconds(200))
        _ = try pulls(6, of: proxy, fake, within: 1.0, "not held behind the slow tag")
        let slowPull = String(decoding: slow.receive(), as: UTF8.self)
        XCTAssertTrue(slowPull.hasPrefix("HTTP/1.1 200"), "answered by the upstream, 1.5 s in, below the 2 s timeout")
        XCTAssertTrue(slowPull.hasSuffix(String(decoding: fake.manifest, as: UTF8.self)))
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 0)
        await proxy.stop()
        await upstream.stop()
    }

    /// Requests the loop must not take over: a tag pull with a body
    /// pipelined behind one answered on the loop (its end once got lost and
    /// the connection hung, untimed), and anything pipelined after a
    /// request that asked to close (llhttp refuses bytes after it: no
    /// upstream `HEAD` for it).
    func testABodyAndARequestAfterCloseAreNotTakenOver() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { head in
            // Slow, so the body comes while the upstream is asked.
            if head.uri.contains("/private/") { return .init(status: .notFound, headDelay: .milliseconds(500)) }
            return fake.reply(head)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        try warm(proxy, fake)
        let host = "Host: 127.0.0.1:\(proxy.port)\r\n"

        // Then a request the async side answers (the ping): a lost end
        // made the async side take its head for the body's end.
        let (_, statuses, seconds) = try await pipelined(proxy,
            "GET /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)\r\n"
                + "GET /v2/lib/private/manifests/latest HTTP/1.1\r\n\(host)Content-Length: 1\r\n\r\n",
            after: .milliseconds(200), then: "x" + "GET /v2/ HTTP/1.1\r\n\(host)Connection: close\r\n\r\n")
        XCTAssertEqual(statuses, ["200", "404", "200"])
        XCTAssertLessThan(seconds, 3, "answered and closed, not left hanging")

        let before = upstream.requests.count
        let closing = try RawSocket(port: proxy.port, receiveTimeout: 5)
        XCTAssertTrue(closing.send(
            "HEAD /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)Connection: close\r\n\r\n"
                + "GET /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)\r\n"))
        let closed = String(decoding: closing.receive(), as: UTF8.self)
        XCTAssertEqual(closed.components(separatedBy: "HTTP/1.1 ").count - 1, 1, "one answer, then the close")
        XCTAssertEqual(upstream.requests.count - before, 1, "nothing asked for the request after the close")
        await proxy.stop()
        await upstream.stop()
    }

    /// A registry written as an IPv6 literal is reached from the loop too.
    func testAnIPv6RegistryIsReachedFromTheLoop() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream: FakeUpstream
        do {
            upstream = try await FakeUpstream(host: "::1") { fake.reply($0) }
        } catch {
            throw XCTSkip("no IPv6 loopback here: \(error)")
        }
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"[::1]\", port: \(upstream.port), schema: \"http\"}")
        for _ in 0..<3 {
            let pull = try curl("\(proxy.base)/v2/lib/app/manifests/latest")
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(pull.body, fake.manifest)
        }
        XCTAssertEqual(try proxy.metric("cacheproxy_manifest_offline_total"), 0)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="0"}"#), 0,
                       "no HEAD failed to connect")
        await proxy.stop()
        await upstream.stop()
    }

    /// A hit delivered from the pipelining handler's buffer, inside the
    /// write of the answer before it (a tag answered on the loop): its own
    /// end comes during its answer, and the next request's end must still
    /// reach the async side (it was dropped, and the connection hung).
    func testAHitPipelinedBehindATagLeavesTheNextRequestWhole() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { fake.reply($0) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port))
        try warm(proxy, fake)
        let host = "Host: 127.0.0.1:\(proxy.port)\r\n"
        let (_, statuses, seconds) = try await pipelined(proxy,
            "GET /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)\r\n"
                + "GET /v2/lib/app/manifests/\(fake.digest) HTTP/1.1\r\n\(host)\r\n",
            after: .milliseconds(300), then: "GET /v2/ HTTP/1.1\r\n\(host)Connection: close\r\n\r\n")
        XCTAssertEqual(statuses, ["200", "200", "200"])
        XCTAssertLessThan(seconds, 3, "the ping answered, not left waiting for its end")
        await proxy.stop()
        await upstream.stop()
    }

    /// Many clients at once for a tag whose upstream never answers hold
    /// the loops' upstream exchanges (32 per upstream per loop; the rest go
    /// the async way): another tag of the same upstream is still answered at
    /// once, and each stalled client gets its 504 after one answer wait,
    /// none left hanging.
    func testManyStalledTagsTakeNothingFromOtherClients() async throws {
        let (upstream, proxy, stuck, started, fake) = try await stalledTags(
            80, timeouts: "timeouts: {upstream: 2, upstream_idle: 2}", otherPullsWithin: 1.5, connection: "Connection: close\r\n")
        // Never seen, so nothing offline to give: each gets the 504, once.
        for socket in stuck {
            let answer = String(decoding: socket.receive(), as: UTF8.self)
            XCTAssertTrue(answer.hasPrefix("HTTP/1.1 504"), String(answer.prefix(40)))
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 6, "one answer wait each, not two")
        // Every stalled exchange was counted back out: the loops, full
        // while the tags stalled, answer pulls themselves again.
        let before = try proxy.metric("cacheproxy_tag_pulls_on_loop_total")
        _ = try pulls(6, of: proxy, fake, within: 3, "after the stall")
        XCTAssertEqual(try proxy.metric("cacheproxy_tag_pulls_on_loop_total") - before, 6, "answered on the loops")
        await proxy.stop()
        await upstream.stop()
    }

    /// A pull by tag the fast path takes from the connection's bytes
    /// (`HitFrontHandler`) is owed its answer while the upstream is asked:
    /// the idle timeout, shorter here than the upstream's wait, does not
    /// close the connection. What the client sends meanwhile waits, and
    /// past the head limit the connection stops reading it (the proxy holds
    /// at most that much, not what the client can push). A refusal handed
    /// to the async side is not asked for twice.
    func testATagTakenFromTheBytesIsOwedItsAnswerAndHoldsWhatFollows() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { head in
            if head.uri.contains("/private/") { return .init(status: .unauthorized) }
            var reply = fake.reply(head)
            if head.uri.contains("/slow/"), head.method == .HEAD { reply.headDelay = .milliseconds(1200) }
            return reply
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        extraYAML: "timeouts: {idle: 0.5, upstream: 4}\nlimits: {max_header_bytes: 4096}")
        try warm(proxy, fake)
        let host = "Host: 127.0.0.1:\(proxy.port)\r\n"

        let refused = try curl("\(proxy.base)/v2/lib/private/manifests/latest")
        XCTAssertEqual(refused.code, 401)
        XCTAssertEqual(upstream.requests.filter { $0.uri.contains("/private/") }.count, 1, "asked once")

        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        let sent = Date()
        XCTAssertTrue(socket.send("GET /v2/lib/slow/manifests/latest HTTP/1.1\r\n\(host)\r\n"))
        try await Task.sleep(for: .milliseconds(100))
        // Then a head far past the limit, pushed without waiting: the
        // kernel's buffers take some megabytes, the proxy only 4 KiB more.
        let flood = Array("GET /v2/ HTTP/1.1\r\n\(host)X-Pad: ".utf8) + [UInt8](repeating: 97, count: 32 << 20)
        var pushed = 0
        let pushing = Date()
        while pushed < flood.count, Date().timeIntervalSince(pushing) < 0.5 {
            let n = flood[pushed...].withUnsafeBytes {
                Glibc.send(socket.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            }
            if n > 0 { pushed += n } else { try await Task.sleep(for: .milliseconds(10)) }
        }
        XCTAssertLessThan(pushed, 20 << 20, "the proxy stopped reading while the tag was asked")

        let head = socket.receiveHead()
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 200"), "answered, not closed as idle: \(head.prefix(40))")
        XCTAssertGreaterThan(Date().timeIntervalSince(sent), 1.1, "after the upstream's answer")
        XCTAssertTrue(head.contains("docker-content-digest: \(fake.digest)"))
        let rest = String(decoding: socket.receive(limit: 4096), as: UTF8.self)
        XCTAssertTrue(rest.hasPrefix(String(decoding: fake.manifest, as: UTF8.self)), "the manifest, whole")
        XCTAssertTrue(rest.contains("HTTP/1.1 431"), "then the oversized head refused: \(rest.suffix(200))")
        XCTAssertEqual(upstream.requests.filter { $0.uri.contains("/slow/") }.count, 1)
        await proxy.stop()
        await upstream.stop()
    }

    /// A client that pipelines pulls by tag without end, reading its
    /// answers as they come: each answer lets the connection read on only
    /// while what waits is under the head limit, so the proxy takes a few
    /// kilobytes at a time, not whatever the client can push.
    func testPipelinedTagPullsAreReadNoFasterThanAnswered() async throws {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { fake.reply($0) }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port),
                                        extraYAML: "limits: {max_header_bytes: 4096}")
        try warm(proxy, fake)
        let pull = "GET /v2/lib/app/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1:\(proxy.port)\r\n\r\n"
        let flood = Array(String(repeating: pull, count: (32 << 20) / pull.utf8.count).utf8)
        let socket = try RawSocket(port: proxy.port)
        var (pushed, received) = (0, 0)
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        let started = Date()
        while pushed < flood.count, Date().timeIntervalSince(started) < 1.5 {
            let sent = flood[pushed...].withUnsafeBytes {
                Glibc.send(socket.fd, $0.baseAddress, min($0.count, 1 << 16), Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            }
            if sent > 0 { pushed += sent }
            let got = recv(socket.fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
            if got > 0 { received += got }
            if sent <= 0, got <= 0 { try await Task.sleep(for: .milliseconds(1)) }
        }
        XCTAssertGreaterThan(received, 0, "answered meanwhile")
        XCTAssertLessThan(pushed, 20 << 20, "read no faster than answered (\(received) bytes of answers)")
        socket.close()
        await proxy.stop()
        await upstream.stop()
    }

    /// The same from the connection's bytes (keep-alive `GET`s, which the
    /// fast path takes): 40 clients whose tag's upstream never answers hold
    /// the loops' exchanges past the answer timeout; another tag is answered
    /// at once meanwhile, each stalled client gets its 504 after one answer
    /// wait, and its connection then serves the next pull.
    func testStalledTagsTakenFromTheBytesGiveWayAndTheirConnectionsGoOn() async throws {
        let (upstream, proxy, stuck, started, _) = try await stalledTags(
            40, timeouts: "timeouts: {upstream: 1, upstream_idle: 1}", otherPullsWithin: 0.8)
        let host = "Host: 127.0.0.1:\(proxy.port)\r\n"
        for socket in stuck {
            let head = socket.receiveHead()
            XCTAssertTrue(head.hasPrefix("HTTP/1.1 504"), String(head.prefix(40)))
            let length = head.lowercased().split(separator: "\r\n")
                .first { $0.hasPrefix("content-length:") }.flatMap { Int($0.dropFirst(15).trimmingCharacters(in: .whitespaces)) }
            var body = [UInt8](repeating: 0, count: length ?? 0)
            if !body.isEmpty { XCTAssertEqual(recv(socket.fd, &body, body.count, Int32(MSG_WAITALL)), body.count) }
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 4, "one answer wait each, not two")
        for socket in stuck.prefix(3) {
            XCTAssertTrue(socket.send("GET /v2/lib/app/manifests/latest HTTP/1.1\r\n\(host)\r\n"))
            XCTAssertTrue(socket.receiveHead().hasPrefix("HTTP/1.1 200"), "the connection goes on after its 504")
        }
        await proxy.stop()
        await upstream.stop()
    }

    /// `count` clients pulling a tag whose upstream never answers its
    /// `HEAD` (`connection`: a header their `GET` adds), then five pulls of
    /// another tag of the same upstream, each answered with its manifest and
    /// all within `otherPullsWithin` seconds: the stalled clients hold the
    /// loops' upstream exchanges, and take nothing from the others. Returns
    /// the stalled clients and when the five pulls began.
    private func stalledTags(_ count: Int, timeouts: String, otherPullsWithin limit: Double, connection: String = "")
        async throws -> (FakeUpstream, TestProxy, [RawSocket], Date, ManifestCacheTests.FakeRegistry) {
        let fake = ManifestCacheTests.FakeRegistry()
        let upstream = try await FakeUpstream { head in
            if head.uri.contains("/stuck/"), head.method == .HEAD { return .init(silent: true) }
            return fake.reply(head)
        }
        let proxy = try await TestProxy(upstreamsYAML: localUpstreamYAML(upstream.port), extraYAML: timeouts)
        try warm(proxy, fake)
        var stuck: [RawSocket] = []
        for _ in 0..<count {
            let socket = try RawSocket(port: proxy.port, receiveTimeout: 10)
            XCTAssertTrue(socket.send("GET /v2/lib/stuck/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1:\(proxy.port)\r\n"
                                      + connection + "\r\n"))
            stuck.append(socket)
        }
        try await Task.sleep(for: .milliseconds(300))
        let started = try pulls(5, of: proxy, fake, within: limit, "not held behind the stalled tags")
        return (upstream, proxy, stuck, started, fake)
    }

    /// `count` pulls of `lib/app:latest`, one after another, each answered
    /// with the manifest, all within `limit` seconds; returns when they began.
    private func pulls(_ count: Int, of proxy: TestProxy, _ fake: ManifestCacheTests.FakeRegistry,
                       within limit: Double, _ why: String) throws -> Date {
        let started = Date()
        for _ in 0..<count {
            let pull = try curl("\(proxy.base)/v2/lib/app/manifests/latest")
            XCTAssertEqual(pull.code, 200)
            XCTAssertEqual(pull.body, fake.manifest)
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), limit, why)
        return started
    }

    /// Two pulls of the tag: the first fills the cache, the second reads the
    /// manifest into memory, so the loop answers the next ones itself.
    /// Sends `requests` on one connection and, `after` a pause, `then`
    /// (which ends with a close); returns what came back, its status codes
    /// in order (a body ends without a line break: they are found
    /// anywhere) and the seconds from the last send to the close.
    private func pipelined(_ proxy: TestProxy, _ requests: String, after pause: Duration = .zero,
                           then more: String = "") async throws
        -> (text: String, statuses: [String], seconds: Double) {
        let socket = try RawSocket(port: proxy.port, receiveTimeout: 5)
        XCTAssertTrue(socket.send(requests))
        if !more.isEmpty {
            try await Task.sleep(for: pause)
            XCTAssertTrue(socket.send(more))
        }
        let started = Date()
        let text = String(decoding: socket.receive(), as: UTF8.self)
        let statuses = text.components(separatedBy: "HTTP/1.1 ").dropFirst().map { String($0.prefix(3)) }
        return (text, statuses, Date().timeIntervalSince(started))
    }

    private func warm(_ proxy: TestProxy, _ fake: ManifestCacheTests.FakeRegistry) throws {
        for _ in 0..<2 { XCTAssertEqual(try curl("\(proxy.base)/v2/lib/app/manifests/latest").body, fake.manifest) }
    }
}
