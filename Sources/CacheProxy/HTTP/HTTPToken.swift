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
        // Spelled out, not `"!#$%&'*+-.^_`|~".utf8.contains(byte)`: that
        // walked the string's UTF-8 view generically, ~440 instructions for
        // each `-` of a header name (`benchmarks/callgrind.sh`).
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"),
             UInt8(ascii: "'"), UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "."),
             UInt8(ascii: "^"), UInt8(ascii: "_"), UInt8(ascii: "`"), UInt8(ascii: "|"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    /// An ASCII letter in lower case; any other byte as it is.
    @inline(__always)
    static func lowercased(_ byte: UInt8) -> UInt8 {
        byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
    }

    /// Whether ASCII `bytes`, lower-cased, equal `lower` (a lower-case
    /// literal): a header name compared as HTTP compares them.
    static func equalsLowercased(_ bytes: UnsafeRawBufferPointer, _ lower: StaticString) -> Bool {
        guard bytes.count == lower.utf8CodeUnitCount else { return false }
        // Indexed, not the generic one's `zip`: this is on every request's
        // field names (`PlainGetHead`), the hit path.
        return lower.withUTF8Buffer { equalsLowercased(bytes[...], $0) }
    }

    /// The same for a range of bytes against lower-case bytes (a literal's,
    /// a media type's essence): indexed over both buffers, where the
    /// generic one's `zip` cost ~500 instructions a range on a pull by tag
    /// (`benchmarks/callgrind.sh`).
    static func equalsLowercased(_ bytes: Slice<UnsafeRawBufferPointer>, _ lower: UnsafeBufferPointer<UInt8>) -> Bool {
        guard bytes.count == lower.count else { return false }
        let base = bytes.startIndex
        for offset in 0..<lower.count where lowercased(bytes.base[base + offset]) != lower[offset] { return false }
        return true
    }

    /// The same against any lower-case bytes (a media type's essence).
    static func equalsLowercased<Bytes: Collection<UInt8>, Lower: Collection<UInt8>>(_ bytes: Bytes, _ lower: Lower)
        -> Bool {
        guard bytes.count == lower.count else { return false }
        return zip(bytes, lower).allSatisfy { lowercased($0) == $1 }
    }
}
