import Foundation
import NIOCore
import NIOHTTP1

/// libFuzzer's entry point. One binary holds every target; `FUZZ_TARGET`
/// picks one (`make fuzz` runs each in turn). Each target checks a property
/// of its parser, not only that it returns: a parser that accepts must give
/// back something consistent with its input.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let text = String(decoding: bytes, as: UTF8.self)
    switch ProcessInfo.processInfo.environment["FUZZ_TARGET"] ?? "" {
    case "route": FuzzTarget.route(text)
    case "digest": FuzzTarget.digest(text)
    case "range": FuzzTarget.range(text)
    case "ns": FuzzTarget.namespace(text)
    case "www-authenticate": FuzzTarget.authenticate(text)
    case "config": FuzzTarget.config(text)
    case "answer-head": FuzzTarget.answerHead(bytes)
    default:
        FileHandle.standardError.write(Data("FUZZ_TARGET must be one of: route digest range ns www-authenticate config answer-head\n".utf8))
        exit(2)
    }
    return 0
}

enum FuzzTarget {
    static let router = Router(upstreams: [
        ProxyConfig.Upstream(host: "mirror.local:5000", registry: "registry-1.docker.io", port: 443, schema: "https",
                             aliases: []),
        ProxyConfig.Upstream(host: "quay.local", registry: "quay.io", port: 443, schema: "https", aliases: ["q.io"]),
    ])

    /// Input: `METHOD uri` on the first line, an optional Host on the second.
    static func route(_ text: String) {
        let lines = text.split(separator: "\n", maxSplits: 2, omittingEmptySubsequences: false)
        let requestLine = lines.first.map(String.init) ?? ""
        let parts = requestLine.split(separator: " ", maxSplits: 1)
        let method = parts.first.map(String.init) ?? ""
        let uri = parts.count > 1 ? String(parts[1]) : ""
        let host = lines.count > 1 ? String(lines[1]) : nil
        if let target = try? RequestTarget.classify(method: method, uri: uri), case .blob(let name, let digest) = target {
            // Whatever is accepted as a blob read names a valid repository
            // and a digest whose text parses back to itself: no path built
            // from them can leave the storage folder.
            check(RepositoryName.isValid(Substring(name)), "accepted an invalid name: \(name)")
            check(!name.contains(".."), "name with ..: \(name)")
            check((try? Digest(parsing: digest.description)) == digest, "digest does not round-trip: \(digest)")
            check(digest.hex.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }, "non-hex digest")
        }
        _ = router.route(host: host, namespace: RequestURI.queryValue("ns", in: uri))
    }

    static func digest(_ text: String) {
        guard let digest = try? Digest(parsing: text) else { return }
        check(digest.description == text, "accepted \(text) as \(digest)")
        check(digest.hex.count == digest.algorithm.hexLength, "wrong length")
    }

    static func range(_ text: String) {
        guard let range = ByteRange(header: text) else { return }
        for size: Int64 in [0, 1, 100, 1 << 40, Int64.max] {
            guard let resolved = range.resolve(size: size) else { continue }
            check(resolved.lowerBound >= 0 && resolved.upperBound < size && resolved.lowerBound <= resolved.upperBound,
                  "\(text) resolved to \(resolved) for size \(size)")
        }
    }

    static func namespace(_ text: String) {
        let uri = "/v2/library/alpine/manifests/latest?" + text
        guard let value = RequestURI.queryValue("ns", in: uri) else { return }
        // The raw value ends at the next `&`; decoding can only shorten it.
        check(value.utf8.count <= text.utf8.count, "ns value longer than the query: \(value)")
        _ = router.route(host: nil, namespace: value)
    }

    static func authenticate(_ text: String) {
        let challenges = AuthChallenge.parse(text)
        check(challenges.count <= 16, "unbounded challenges")
        for challenge in challenges {
            check(!challenge.scheme.isEmpty, "empty scheme")
            check(challenge.scheme == challenge.scheme.lowercased(), "scheme not lowercased")
            check(challenge.parameters.count <= 32, "unbounded parameters")
        }
    }

    /// A config file either loads or fails with a ConfigError naming a key;
    /// nothing else (a crash, another error) is acceptable.
    static func config(_ text: String) {
        do {
            let config = try ConfigLoader.parse(yaml: text)
            check(!config.upstreams.isEmpty, "loaded without upstreams")
        } catch let error as ConfigError {
            check(!error.key.isEmpty, "error without a key: \(error)")
        } catch {
            check(false, "not a ConfigError: \(error)")
        }
    }

    /// Input: the bytes an upstream answers a tag's `HEAD` with, read on
    /// the event loop without NIO's decoder (`UpstreamAnswerHead`). A head
    /// it accepts ends at the input's first blank line, within the limit;
    /// a shorter prefix of it is never a head; every field it gives has a
    /// token for a name and a value without line ends or edge spaces; and
    /// the fields it noted on its walk are the ones a lookup by name finds.
    static func answerHead(_ bytes: [UInt8]) {
        let limit = 1024
        let blankLine = bytes.indices.first { index in
            index + 4 <= bytes.count && bytes[index..<index + 4].elementsEqual([13, 10, 13, 10])
        }.map { $0 + 4 }
        switch UpstreamAnswerHead.parse(ByteBuffer(bytes: bytes), limit: limit) {
        case .incomplete:
            check(blankLine == nil, "incomplete, though a blank line ends the head")
            check(bytes.count < limit, "incomplete past the limit")
        case .malformed:
            break
        case .head(let head, let length):
            check(length == blankLine && length <= limit, "head of \(length) bytes, blank line at \(String(describing: blankLine))")
            check((100...999).contains(head.status.code), "status \(head.status.code)")
            check(head.version == .http1_1 || head.version == .http1_0, "version \(head.version)")
            for field in head.headers {
                check(!field.name.isEmpty && field.name.utf8.allSatisfy(HTTPToken.isCharacter), "field name \(field.name)")
                check(!field.value.utf8.contains(13) && !field.value.utf8.contains(10), "line end in \(field.value)")
                check(field.value.first != " " && field.value.first != "\t" && field.value.last != " "
                          && field.value.last != "\t", "untrimmed value \(field.value)")
            }
            check(head.digestField == head.first(name: "docker-content-digest"), "digest field noted apart from lookup")
            check(head.contentType == head.first(name: "content-type"), "content type noted apart from lookup")
            check(head.rateLimitRemaining == head.first(name: "ratelimit-remaining"), "rate limit noted apart from lookup")
            if case .head = UpstreamAnswerHead.parse(ByteBuffer(bytes: bytes[..<(length - 1)]), limit: limit) {
                check(false, "a prefix of the head is a head")
            }
        }
    }

    static func check(_ condition: Bool, _ message: @autoclosure () -> String) {
        guard condition else {
            FileHandle.standardError.write(Data("property violated: \(message())\n".utf8))
            abort()
        }
    }
}

/// SwiftPM links an executable target's entry point as `ParserFuzz_main`
/// (and points `main` at it); libFuzzer's driver is started from here.
@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

@_cdecl("ParserFuzz_main")
public func parserFuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var arguments = argv
    return runFuzzerDriver(&count, &arguments) { data, size in
        guard let data, size > 0 else { return 0 }
        return fuzzOneInput(data, size)
    }
}
