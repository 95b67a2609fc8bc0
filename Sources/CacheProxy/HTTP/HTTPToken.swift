/// RFC 9110 `token`, for the parsers that read HTTP as bytes
/// (`PlainGetHead`, a client's head; `UpstreamAnswerHead`, an upstream's;
/// `AuthChallenge`, a `WWW-Authenticate` value).
enum HTTPToken {
    /// A `tchar`: what a header name is made of.
    static func isCharacter(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "!#$%&'*+-.^_`|~".utf8.contains(byte)
        }
    }

    /// Whether ASCII `bytes`, lower-cased, equal `lower` (a lower-case
    /// literal): a header name compared as HTTP compares them.
    static func equalsLowercased(_ bytes: UnsafeRawBufferPointer, _ lower: StaticString) -> Bool {
        guard bytes.count == lower.utf8CodeUnitCount else { return false }
        return lower.withUTF8Buffer { expected in
            for index in 0..<bytes.count {
                let byte = bytes[index]
                let folded = byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
                guard folded == expected[index] else { return false }
            }
            return true
        }
    }
}
