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
struct UpstreamAnswerHead: Equatable {
    let version: HTTPVersion
    let status: HTTPResponseStatus
    /// Whether the connection may carry another request, as NIO's
    /// `HTTPHeaders.isKeepAlive` reads the `Connection` fields' tokens (split
    /// at commas, spaces and tabs trimmed, case ignored): never after a
    /// `close` (or a `keep-alive` said twice), always after one
    /// `keep-alive`, and otherwise for HTTP/1.1 only. (NIO splits at
    /// characters, so a comma followed by a combining mark does not split
    /// there; such a value, non-ASCII in a `Connection` field, may read
    /// differently.)
    let isKeepAlive: Bool
    /// The field lines, each ending in CRLF, as they came (checked by
    /// `parse`). Looked up by name when asked: a pull answered on the loop
    /// reads two or three fields, and a `String` per name and value of every
    /// field (an `HTTPHeaders`) was the most of the parse's cost.
    private let fields: ByteBuffer
    /// Where the values of the fields every answer on the loop reads lie in
    /// `fields` (the first of each name, trimmed), found by `parse` on its
    /// one walk over the names: a walk of the lines per field asked cost
    /// ~950 instructions (`benchmarks/callgrind.sh`).
    private let known: Known

    struct Known: Equatable {
        var digest: Range<Int>?
        var contentType: Range<Int>?
        var rateLimitRemaining: Range<Int>?
    }

    /// `Docker-Content-Digest`.
    var digestField: String? { value(at: known.digest) }
    /// `Content-Type`.
    var contentType: String? { value(at: known.contentType) }
    /// `RateLimit-Remaining` (Docker Hub's).
    var rateLimitRemaining: String? { value(at: known.rateLimitRemaining) }

    private func value(at range: Range<Int>?) -> String? {
        guard let range else { return nil }
        return fields.getString(at: fields.readerIndex + range.lowerBound, length: range.count)
    }

    enum Parsed: Equatable {
        /// A whole head, and its length with the blank line.
        case head(UpstreamAnswerHead, length: Int)
        /// Not all of it yet.
        case incomplete
        case malformed
    }

    /// The head at the start of `buffer`'s readable bytes.
    static func parse(_ buffer: ByteBuffer, limit: Int) -> Parsed {
        buffer.withUnsafeReadableBytes { parse($0, of: buffer, limit: limit) }
    }

    /// The first field named `name` (a lower-case literal; names compare
    /// without case), its value without the spaces around it.
    func first(name: StaticString) -> String? {
        var found: String?
        forEachField { fieldName, value in
            guard HTTPToken.equalsLowercased(fieldName, name) else { return true }
            found = String(decoding: value, as: UTF8.self)
            return false
        }
        return found
    }

    /// Every field, names as sent: for the answers the loop hands on (the
    /// async side's `TagResolver`, a `HEAD` passed through).
    var headers: HTTPHeaders {
        var headers = HTTPHeaders()
        forEachField { name, value in
            headers.add(name: String(decoding: name, as: UTF8.self), value: String(decoding: value, as: UTF8.self))
            return true
        }
        return headers
    }

    /// Calls `body` with each field's name and trimmed value, in order,
    /// until it returns false. The lines were checked by `parse`: each is
    /// `name:` then the value, and ends in CRLF.
    private func forEachField(_ body: (_ name: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Bool) {
        fields.withUnsafeReadableBytes { bytes in
            var index = 0
            while index < bytes.count {
                let nameStart = index
                while index < bytes.count, bytes[index] != UInt8(ascii: ":") { index += 1 }
                let nameEnd = index
                index += 1
                while index < bytes.count, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
                let valueStart = index
                while index < bytes.count, bytes[index] != 13 { index += 1 }
                var valueEnd = index
                while valueEnd > valueStart, bytes[valueEnd - 1] == 0x20 || bytes[valueEnd - 1] == 0x09 { valueEnd -= 1 }
                index += 2
                guard nameEnd <= bytes.count, valueEnd <= bytes.count else { return }
                guard body(UnsafeRawBufferPointer(rebasing: bytes[nameStart..<nameEnd]),
                           UnsafeRawBufferPointer(rebasing: bytes[valueStart..<valueEnd]))
                else { return }
            }
        }
    }

    /// `bytes`: `buffer`'s readable bytes, which the field lines are
    /// sliced from (a reference, no copy).
    private static func parse(_ bytes: UnsafeRawBufferPointer, of buffer: ByteBuffer, limit: Int) -> Parsed {
        // Where the bytes end or the limit is reached, whichever is first:
        // running out there is `incomplete`, or past the limit `malformed`.
        let end = min(bytes.count, limit)
        func short() -> Parsed { bytes.count >= limit ? .malformed : .incomplete }
        let prefix: StaticString = "HTTP/1."
        // Indexed, not `zip` over a `String.UTF8View`: a generic walk cost
        // ~600 instructions a pull (`benchmarks/callgrind.sh`).
        let startsLikeStatusLine = prefix.withUTF8Buffer { expected in
            (0..<min(bytes.count, expected.count)).allSatisfy { bytes[$0] == expected[$0] }
        }
        // Each byte is checked as it comes: a head cut short is
        // `incomplete` only while what came could still begin a status line
        // (`HTTP/1.` then a blank line is malformed at once, not waited on).
        guard startsLikeStatusLine else { return .malformed }
        var index = prefix.utf8CodeUnitCount
        guard index < end else { return short() }
        let minor: Int
        switch bytes[index] {
        case UInt8(ascii: "0"): minor = 0
        case UInt8(ascii: "1"): minor = 1
        default: return .malformed
        }
        index += 1
        guard index < end else { return short() }
        guard bytes[index] == UInt8(ascii: " ") else { return .malformed }
        index += 1
        var code = 0
        for _ in 0..<3 {
            guard index < end else { return short() }
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
        let fieldsStart = index
        var (closes, keepAlives) = (0, 0)
        var known = Known()
        while true {
            guard index < end else { return short() }
            if bytes[index] == 13 {
                guard let after = lineEnd(bytes, at: index, end: end) else { return short() }
                guard after > 0 else { return .malformed }
                // NIO's reading: any `close`, or `keep-alive` said twice,
                // closes; one `keep-alive` keeps; neither, the version decides.
                let keepAlive = closes == 0 && keepAlives <= 1 && (keepAlives == 1 || minor == 1)
                let lines = buffer.getSlice(at: buffer.readerIndex + fieldsStart, length: index - fieldsStart)
                return .head(UpstreamAnswerHead(version: HTTPVersion(major: 1, minor: minor),
                                                status: HTTPResponseStatus(statusCode: code), isKeepAlive: keepAlive,
                                                fields: lines ?? ByteBuffer(), known: known), length: after)
            }
            let nameStart = index
            while index < end, HTTPToken.isCharacter(bytes[index]) { index += 1 }
            guard index < end else { return short() }
            // No name (an obs-fold starts with a space), or not `:` after it.
            guard index > nameStart, bytes[index] == UInt8(ascii: ":") else { return .malformed }
            let nameEnd = index
            index += 1
            let valueStart = index
            while index < end, isFieldByte(bytes[index]) { index += 1 }
            guard let after = lineEnd(bytes, at: index, end: end) else { return short() }
            guard after > 0 else { return .malformed }
            let name = UnsafeRawBufferPointer(rebasing: bytes[nameStart..<nameEnd])
            // The first of each, as `first(name:)` would find it: trimmed,
            // and relative to the field lines.
            func trimmedValue() -> Range<Int> {
                var (from, to) = (valueStart, index)
                while from < to, bytes[from] == 0x20 || bytes[from] == 0x09 { from += 1 }
                while to > from, bytes[to - 1] == 0x20 || bytes[to - 1] == 0x09 { to -= 1 }
                return (from - fieldsStart)..<(to - fieldsStart)
            }
            if known.digest == nil, HTTPToken.equalsLowercased(name, "docker-content-digest") {
                known.digest = trimmedValue()
            } else if known.contentType == nil, HTTPToken.equalsLowercased(name, "content-type") {
                known.contentType = trimmedValue()
            } else if known.rateLimitRemaining == nil, HTTPToken.equalsLowercased(name, "ratelimit-remaining") {
                known.rateLimitRemaining = trimmedValue()
            }
            if HTTPToken.equalsLowercased(name, "connection") {
                connectionTokens(UnsafeRawBufferPointer(rebasing: bytes[valueStart..<index])) { token in
                    if HTTPToken.equalsLowercased(token, "close") { closes += 1 }
                    if HTTPToken.equalsLowercased(token, "keep-alive") { keepAlives += 1 }
                }
            }
            index = after
        }
    }

    /// The comma-separated tokens of a `Connection` value, without the
    /// spaces around them.
    private static func connectionTokens(_ value: UnsafeRawBufferPointer, _ body: (UnsafeRawBufferPointer) -> Void) {
        var start = 0
        for index in 0...value.count where index == value.count || value[index] == UInt8(ascii: ",") {
            var (from, to) = (start, index)
            while from < to, value[from] == 0x20 || value[from] == 0x09 { from += 1 }
            while to > from, value[to - 1] == 0x20 || value[to - 1] == 0x09 { to -= 1 }
            body(UnsafeRawBufferPointer(rebasing: value[from..<to]))
            start = index + 1
        }
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
    static func isFieldByte(_ byte: UInt8) -> Bool {
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
