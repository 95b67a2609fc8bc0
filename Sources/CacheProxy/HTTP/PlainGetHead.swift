/// The one request shape the hit fast path answers, read straight from the
/// connection's bytes: `GET <path> HTTP/1.1`, a `Host`, perhaps an
/// `Authorization` (and, kept for a pull by tag's upstream `HEAD`, an
/// `Accept` and a `User-Agent`), nothing that frames a body or changes the
/// answer.
///
/// The parser says nil to anything else, however valid: NIO's decoder,
/// the request checks and the rest of the pipeline stay the authority on
/// HTTP. So it only has to agree with them on what it accepts, and it
/// accepts a strict subset: CRLF line ends only, header names of token
/// characters, values of visible ASCII, space and tab, no obs-fold, exactly
/// one `Host`, at most one `Authorization` and `User-Agent`, and none of `Content-Length`,
/// `Transfer-Encoding`, `Expect`, `Upgrade`, `Range`, `Proxy-Connection`, or
/// a `Connection` other than `keep-alive`. Where a head ends is then beyond dispute (the
/// first CRLF CRLF, no body), so no byte can be read as two requests.
struct PlainGetHead: Equatable {
    /// The request target as sent (origin-form: it starts with `/`).
    var target: String
    var host: String?
    var authorization: String?
    /// Where the `Accept` and `User-Agent` values lie in the head's bytes,
    /// kept as offsets, not strings: only a pull by tag needs them (they go
    /// to the upstream), and the hit path must not pay for them.
    var accept: Range<Int>?
    var userAgent: Range<Int>?
    /// More than one `Accept` (Docker sends one per media type): a pull by
    /// tag then goes the decoder's way, which keeps them all.
    var acceptCount = 0

    /// The head at the start of `bytes` and its length, or nil.
    /// `limit`: the longest head accepted (longer ones go to the decoder,
    /// which refuses them).
    static func parse(_ bytes: UnsafeRawBufferPointer, limit: Int) -> (head: PlainGetHead, length: Int)? {
        let end = min(bytes.count, limit)
        guard end > 16, bytes[0] == UInt8(ascii: "G"), bytes[1] == UInt8(ascii: "E"), bytes[2] == UInt8(ascii: "T"),
              bytes[3] == UInt8(ascii: " "), bytes[4] == UInt8(ascii: "/")
        else { return nil }
        // The target: visible ASCII but `#`, up to one space.
        var index = 4
        while index < end, bytes[index] > 0x20, bytes[index] < 0x7f, bytes[index] != UInt8(ascii: "#") { index += 1 }
        let targetEnd = index
        let version: StaticString = " HTTP/1.1\r\n"
        guard index + version.utf8CodeUnitCount <= end,
              version.withUTF8Buffer({ expected in expected.indices.allSatisfy { bytes[index + $0] == expected[$0] } })
        else { return nil }
        index += version.utf8CodeUnitCount
        var head = PlainGetHead(target: String(decoding: bytes[4..<targetEnd], as: UTF8.self))
        while true {
            guard index + 1 < end else { return nil }  // no end of head within the bytes
            if bytes[index] == 13 {
                // No Host: the request checks answer 400 (RFC 9112 §3.2).
                guard bytes[index + 1] == 10, head.host != nil else { return nil }
                return (head, index + 2)
            }
            // A name of token characters, then `:`.
            let nameStart = index
            while index < end, HTTPToken.isCharacter(bytes[index]) { index += 1 }
            guard index < end, index > nameStart, bytes[index] == UInt8(ascii: ":") else { return nil }
            let name = UnsafeRawBufferPointer(rebasing: bytes[nameStart..<index])
            index += 1
            while index < end, bytes[index] == 0x20 || bytes[index] == 0x09 { index += 1 }
            let valueStart = index
            while index < end, (bytes[index] >= 0x20 && bytes[index] < 0x7f) || bytes[index] == 0x09 { index += 1 }
            guard index + 1 < end, bytes[index] == 13, bytes[index + 1] == 10 else { return nil }
            // Trailing spaces stay, as NIO's decoder keeps them: both paths
            // must route and check the same value (found by the differential
            // test).
            let valueEnd = index
            index += 2
            switch Field(name) {
            case .host:
                guard head.host == nil else { return nil }
                head.host = String(decoding: bytes[valueStart..<valueEnd], as: UTF8.self)
            case .authorization:
                guard head.authorization == nil else { return nil }
                head.authorization = String(decoding: bytes[valueStart..<valueEnd], as: UTF8.self)
            case .accept:
                head.acceptCount += 1
                head.accept = valueStart..<valueEnd
            case .userAgent:
                guard head.userAgent == nil else { return nil }
                head.userAgent = valueStart..<valueEnd
            case .connection:
                guard HTTPToken.equalsLowercased(UnsafeRawBufferPointer(rebasing: bytes[valueStart..<valueEnd]), "keep-alive")
                else { return nil }
            case .refused:
                return nil
            case .other:
                break
            }
        }
    }

    /// What a header name means to the fast path.
    private enum Field {
        case host, authorization, accept, userAgent, connection, refused, other

        /// The names it knows, lower-case. A name of another length is
        /// passed over by `equalsLowercased`'s length check alone.
        private static let known: [(name: StaticString, field: Field)] = [
            ("host", .host), ("authorization", .authorization), ("connection", .connection),
            ("accept", .accept), ("user-agent", .userAgent),
            // Anything that frames a body, asks for part of it or changes
            // the protocol goes to NIO's decoder.
            ("content-length", .refused), ("transfer-encoding", .refused), ("expect", .refused),
            ("upgrade", .refused), ("range", .refused), ("if-range", .refused), ("te", .refused),
            // llhttp reads it as `Connection` (and `close` as the last request).
            ("proxy-connection", .refused),
        ]

        init(_ name: UnsafeRawBufferPointer) {
            self = Self.known.first { HTTPToken.equalsLowercased(name, $0.name) }?.field ?? .other
        }
    }
}
