import NIOCore
import NIOHTTP1

/// The head of an upstream's answer to a `HEAD`, read straight from the
/// connection's bytes (`UpstreamExchangeHandler`), and the request written
/// as bytes.
///
/// Why by hand: the loop's tag lookups (`TagLookup`) ask only `HEAD`s, whose
/// answers end with their head whatever their framing headers say (RFC 9112
/// §6.3), so a parser needs no body framing at all; NIO's client codec
/// (llhttp, a ByteToMessageHandler, the encoder and its header check) was
/// about a tenth of the proxy's CPU on a pull by tag (benchmarks/RESULTS.md).
///
/// It is strict, and says `malformed` to anything it does not take (the
/// exchange then fails, as it did when llhttp refused): CRLF line ends
/// only, `HTTP/1.0` or `HTTP/1.1`, a three-digit status, header names of
/// token characters, values without control characters (obs-text passes,
/// as llhttp lets it), no obs-fold, a head of at most `limit` bytes.
enum UpstreamAnswerHead {
    enum Parsed: Equatable {
        /// A whole head, and its length with the blank line.
        case head(HTTPResponseHead, length: Int)
        /// Not all of it yet.
        case incomplete
        case malformed
    }

    static func parse(_ bytes: UnsafeRawBufferPointer, limit: Int) -> Parsed {
        // Where the bytes end or the limit is reached, whichever is first:
        // running out there is `incomplete`, or past the limit `malformed`.
        let end = min(bytes.count, limit)
        func short() -> Parsed { bytes.count >= limit ? .malformed : .incomplete }
        let prefix = "HTTP/1.".utf8
        guard end >= prefix.count + 5 else {
            // Whatever came must at least start like a status line.
            return zip(bytes, prefix).allSatisfy({ $0 == $1 }) ? short() : .malformed
        }
        guard zip(bytes, prefix).allSatisfy({ $0 == $1 }) else { return .malformed }
        var index = prefix.count
        let minor: Int
        switch bytes[index] {
        case UInt8(ascii: "0"): minor = 0
        case UInt8(ascii: "1"): minor = 1
        default: return .malformed
        }
        index += 1
        guard bytes[index] == UInt8(ascii: " ") else { return .malformed }
        index += 1
        guard index + 3 <= end else { return short() }
        var code = 0
        for _ in 0..<3 {
            let digit = bytes[index]
            guard digit >= UInt8(ascii: "0"), digit <= UInt8(ascii: "9") else { return .malformed }
            code = code * 10 + Int(digit - UInt8(ascii: "0"))
            index += 1
        }
        guard code >= 100 else { return .malformed }
        // The reason phrase, if any, is not kept.
        guard index < end else { return short() }
        if bytes[index] == UInt8(ascii: " ") {
            index += 1
            while index < end, isFieldByte(bytes[index]) { index += 1 }
        }
        guard let afterStatus = lineEnd(bytes, at: index, end: end) else { return short() }
        guard afterStatus > 0 else { return .malformed }
        index = afterStatus
        var headers = HTTPHeaders()
        headers.reserveCapacity(16)  // one allocation, not one per doubling
        while true {
            guard index < end else { return short() }
            if bytes[index] == 13 {
                guard let after = lineEnd(bytes, at: index, end: end) else { return short() }
                guard after > 0 else { return .malformed }
                let status = HTTPResponseStatus(statusCode: code)
                return .head(HTTPResponseHead(version: .init(major: 1, minor: minor), status: status,
                                              headers: headers), length: after)
            }
            let nameStart = index
            while index < end, HTTPToken.isCharacter(bytes[index]) { index += 1 }
            guard index < end else { return short() }
            // No name (an obs-fold starts with a space), or not `:` after it.
            guard index > nameStart, bytes[index] == UInt8(ascii: ":") else { return .malformed }
            let nameEnd = index
            index += 1
            while index < end, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
            let valueStart = index
            while index < end, isFieldByte(bytes[index]) { index += 1 }
            var valueEnd = index
            while valueEnd > valueStart, bytes[valueEnd - 1] == 0x20 || bytes[valueEnd - 1] == 0x09 { valueEnd -= 1 }
            guard let after = lineEnd(bytes, at: index, end: end) else { return short() }
            guard after > 0 else { return .malformed }
            headers.add(name: fieldName(UnsafeRawBufferPointer(rebasing: bytes[nameStart..<nameEnd])),
                        value: String(decoding: bytes[valueStart..<valueEnd], as: UTF8.self))
            index = after
        }
    }

    /// Names longer than a small string (15 bytes) that registries send on
    /// every answer, spelled as they send them: one of these, byte for byte,
    /// is used as it is, where a `String` made of the bytes would cost an
    /// allocation per field per pull.
    private static let knownNames = [
        "Docker-Content-Digest", "docker-content-digest", "Docker-Distribution-Api-Version",
        "docker-distribution-api-version", "X-Content-Type-Options", "x-content-type-options",
        "Strict-Transport-Security", "strict-transport-security", "Www-Authenticate", "WWW-Authenticate",
        "www-authenticate", "RateLimit-Remaining", "ratelimit-remaining", "docker-ratelimit-source",
    ]

    /// The name in `bytes` (token characters, so ASCII).
    private static func fieldName(_ bytes: UnsafeRawBufferPointer) -> String {
        if bytes.count > 15 {
            for known in knownNames where known.utf8.count == bytes.count && known.utf8.elementsEqual(bytes) {
                return known
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// After a CRLF at `index`: the index past it, nil when the bytes end
    /// first, 0 when something else stands there.
    private static func lineEnd(_ bytes: UnsafeRawBufferPointer, at index: Int, end: Int) -> Int? {
        guard index < end else { return nil }
        guard bytes[index] == 13 else { return 0 }
        guard index + 1 < end else { return nil }
        return bytes[index + 1] == 10 ? index + 2 : 0
    }

    /// A byte of a field value or reason phrase: HTAB, SP, visible ASCII,
    /// obs-text.
    private static func isFieldByte(_ byte: UInt8) -> Bool {
        byte == 0x09 || (byte >= 0x20 && byte != 0x7f)
    }

    /// `HEAD <uri> HTTP/1.1` with `headers`, as bytes. False, having written
    /// nothing, when the target or a header could end a line or a field
    /// (they come from the client's validated head and the configuration,
    /// so this is a last line, not a check anyone relies on).
    static func writeRequest(uri: String, headers: HTTPHeaders, into out: inout ByteBuffer) -> Bool {
        guard uri.utf8.allSatisfy({ $0 > 0x20 && $0 != 0x7f }),
              headers.allSatisfy({ field in
                  !field.name.isEmpty && field.name.utf8.allSatisfy(HTTPToken.isCharacter)
                      && field.value.utf8.allSatisfy(isFieldByte)
              })
        else { return false }
        out.writeStaticString("HEAD ")
        out.writeString(uri)
        out.writeStaticString(" HTTP/1.1\r\n")
        for field in headers {
            out.writeString(field.name)
            out.writeStaticString(": ")
            out.writeString(field.value)
            out.writeStaticString("\r\n")
        }
        out.writeStaticString("\r\n")
        return true
    }
}
