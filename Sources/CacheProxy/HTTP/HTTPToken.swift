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
}
