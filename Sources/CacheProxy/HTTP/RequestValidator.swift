import NIOCore
import NIOHTTP1

/// Refuses request heads a proxy must not act on, before anything routes
/// them (RFC 9112 §3.2, DESIGN.md "Request targets"):
/// - `CONNECT` (405): this is not a tunnel;
/// - a target that is not origin-form (`/…`), except `OPTIONS *` (answered
///   here) and absolute-form naming a configured host (RFC 9112 §3.2.2),
///   which is rewritten to origin-form with that authority as `Host`;
///   any other authority gets 421, anything else 400;
/// - no `Host` or more than one, or framing that two parsers could read two
///   ways (`Content-Length` with `Transfer-Encoding`, several lengths, a
///   coding other than `chunked`): 400.
/// So no byte of a request can choose the host, port or scheme the proxy
/// connects to: the upstream URL is always the configured upstream plus a
/// path that starts with `/`.
///
/// Pure checks plus the refusal's writing; `RequestFrontHandler` applies
/// them to every head, after the pipelining handler, so its answers keep
/// their place among pipelined responses. A refused request closes the
/// connection: after a framing error nothing that follows can be trusted to
/// start a request.
enum RequestValidator {
    enum Verdict: Equatable {
        case accept(HTTPRequestHead)
        case answerOptions
        case refuse(OCIError, HTTPHeaders)

        static func == (lhs: Verdict, rhs: Verdict) -> Bool {
            switch (lhs, rhs) {
            case (.accept(let a), .accept(let b)): return a == b
            case (.answerOptions, .answerOptions): return true
            case (.refuse(let a, _), .refuse(let b, _)): return a.status == b.status && a.code == b.code
            default: return false
            }
        }
    }

    static let allowed = "GET, HEAD, PUT, POST, PATCH, DELETE, OPTIONS"

    static func check(_ head: HTTPRequestHead, router: Router) -> Verdict {
        if head.method == .CONNECT {
            return .refuse(OCIError(.methodNotAllowed, .unsupported, "CONNECT is not supported: this is a registry cache, not a tunnel"),
                           ["allow": allowed])
        }
        // One pass over the header names, without allocating: this runs on
        // every request, the 4 KiB hit included. Only a request that carries
        // framing headers looks at their values.
        var hosts = 0
        var framing = false
        for (name, _) in head.headers {
            switch name.utf8.count {
            case 4 where name.lowercased() == "host": hosts += 1
            case 14 where name.lowercased() == "content-length": framing = true
            case 17 where name.lowercased() == "transfer-encoding": framing = true
            default: break
            }
        }
        if hosts > 1 || (hosts == 0 && head.version != .http1_0) {
            return .refuse(OCIError(.badRequest, .unsupported, "a request needs exactly one Host header"), [:])
        }
        if framing, let problem = framingProblem(head.headers) {
            return .refuse(OCIError(.badRequest, .unsupported, problem), [:])
        }
        let uri = head.uri
        if uri == "*" {
            return head.method == .OPTIONS
                ? .answerOptions
                : .refuse(OCIError(.badRequest, .unsupported, "the target * is only for OPTIONS"), [:])
        }
        guard uri.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7f && $0 != UInt8(ascii: "#") }) else {
            return .refuse(OCIError(.badRequest, .unsupported, "the request target has characters no URL may carry"), [:])
        }
        if uri.hasPrefix("/") { return .accept(head) }
        guard let absolute = AbsoluteTarget(uri) else {
            return .refuse(OCIError(.badRequest, .unsupported, "the request target must be a path starting with /"), [:])
        }
        guard router.route(host: absolute.authority, namespace: nil) != nil else {
            return .refuse(OCIError(.misdirectedRequest, .unsupported,
                                    "this proxy does not serve \(absolute.authority.prefix(100))"), [:])
        }
        var rewritten = head
        rewritten.uri = absolute.originForm
        rewritten.headers.replaceOrAdd(name: "host", value: absolute.authority)
        return .accept(rewritten)
    }

    /// Two readings of where a request body ends are how requests are
    /// smuggled past a proxy: refuse every head that allows more than one.
    static func framingProblem(_ headers: HTTPHeaders) -> String? {
        let lengths = headers["content-length"]
        let codings = headers[canonicalForm: "transfer-encoding"]
        if !lengths.isEmpty, !codings.isEmpty {
            return "Content-Length and Transfer-Encoding together are refused"
        }
        if lengths.count > 1 || lengths.contains(where: { Int64(digitsOnly: Substring($0)) == nil }) {
            return "exactly one Content-Length of digits is allowed"
        }
        if !codings.isEmpty, codings.map({ $0.lowercased() }) != ["chunked"] {
            return "only Transfer-Encoding: chunked is supported"
        }
        return nil
    }

    /// Writes a whole local answer (a refusal, or `OPTIONS *`).
    static func respond(_ context: ChannelHandlerContext, status: HTTPResponseStatus, version: HTTPVersion,
                        extra: HTTPHeaders, error: OCIError?, close: Bool) {
        let wrap = { (part: HTTPServerResponsePart) in NIOAny(part) }
        let body = error.map { ByteBuffer(string: $0.body) } ?? ByteBuffer()
        var headers = extra
        if error != nil { headers.add(name: "content-type", value: "application/json") }
        headers.add(name: "content-length", value: String(body.readableBytes))
        if close { headers.add(name: "connection", value: "close") }
        context.write(wrap(.head(HTTPResponseHead(version: version, status: status, headers: headers))), promise: nil)
        if body.readableBytes > 0 { context.write(wrap(.body(.byteBuffer(body))), promise: nil) }
        let channel = context.channel
        let written = context.writeAndFlush(wrap(.end(nil)))
        if close { written.whenComplete { _ in channel.close(promise: nil) } }
    }
}

/// An absolute-form request target, `http(s)://authority/path?query`.
struct AbsoluteTarget {
    let authority: String
    let originForm: String

    init?(_ uri: String) {
        let lower = uri.lowercased()
        let rest: Substring
        if lower.hasPrefix("http://") {
            rest = uri.dropFirst(7)
        } else if lower.hasPrefix("https://") {
            rest = uri.dropFirst(8)
        } else {
            return nil
        }
        let slash = rest.firstIndex(where: { $0 == "/" || $0 == "?" }) ?? rest.endIndex
        let authority = rest[..<slash]
        // No userinfo: `user@host` is how a target smuggles a second host.
        guard !authority.isEmpty, !authority.contains("@") else { return nil }
        self.authority = authority.lowercased()
        let tail = rest[slash...]
        originForm = tail.hasPrefix("/") ? String(tail) : "/" + tail
    }
}
