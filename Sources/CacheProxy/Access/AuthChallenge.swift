/// One challenge of a `WWW-Authenticate` header (RFC 9110 §11.6.1):
/// `Bearer realm="https://auth.example/token",service="registry",scope="repository:a:pull"`.
///
/// Parsed by hand, byte by byte, because the header comes from the
/// upstream and its quoted values may hold commas (`scope="repository:a:pull,push"`):
/// a split on commas would cut them. Anything malformed ends the parse with
/// what was read so far; nothing here can trap (it is fuzzed: `make fuzz`).
public struct AuthChallenge: Sendable, Equatable {
    /// Lowercased: `basic`, `bearer`.
    public let scheme: String
    /// Parameter names lowercased, values unquoted.
    public let parameters: [String: String]

    public subscript(_ name: String) -> String? { parameters[name] }

    public static func parse(_ header: String) -> [AuthChallenge] {
        var reader = Reader(bytes: Array(header.utf8))
        var challenges: [AuthChallenge] = []
        while challenges.count < 16 {
            reader.skip { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\t") || $0 == UInt8(ascii: ",") }
            guard let scheme = reader.token(), !scheme.isEmpty else { break }
            var parameters: [String: String] = [:]
            while parameters.count < 32 {
                reader.skipSpaces()
                let mark = reader.index
                guard let name = reader.token(), !name.isEmpty else { break }
                reader.skipSpaces()
                guard reader.take(UInt8(ascii: "=")) else {
                    reader.index = mark  // a bare token: the next challenge's scheme
                    break
                }
                reader.skipSpaces()
                guard let value = reader.peek == UInt8(ascii: "\"") ? reader.quoted() : reader.token68() else {
                    return challenges + [AuthChallenge(scheme: scheme.lowercased(), parameters: parameters)]
                }
                parameters[name.lowercased()] = value
                reader.skipSpaces()
                if !reader.take(UInt8(ascii: ",")) { break }
            }
            challenges.append(AuthChallenge(scheme: scheme.lowercased(), parameters: parameters))
        }
        return challenges
    }

    private struct Reader {
        let bytes: [UInt8]
        var index = 0

        var peek: UInt8? { index < bytes.count ? bytes[index] : nil }

        mutating func take(_ byte: UInt8) -> Bool {
            guard peek == byte else { return false }
            index += 1
            return true
        }

        mutating func skip(while predicate: (UInt8) -> Bool) {
            while let byte = peek, predicate(byte) { index += 1 }
        }

        mutating func skipSpaces() {
            skip { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\t") }
        }

        mutating func token() -> String? {
            let start = index
            skip(while: HTTPToken.isCharacter)
            return String(decoding: bytes[start..<index], as: UTF8.self)
        }

        /// An unquoted value: a token, with the `/` and `=` of token68 and
        /// of unquoted URLs some servers send.
        mutating func token68() -> String? {
            let start = index
            skip { HTTPToken.isCharacter($0) || $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "=") || $0 == UInt8(ascii: ":") }
            return index > start ? String(decoding: bytes[start..<index], as: UTF8.self) : nil
        }

        /// A quoted string with `\` escapes; nil when it never closes.
        mutating func quoted() -> String? {
            guard take(UInt8(ascii: "\"")) else { return nil }
            var out: [UInt8] = []
            while let byte = peek {
                index += 1
                switch byte {
                case UInt8(ascii: "\""):
                    return String(decoding: out, as: UTF8.self)
                case UInt8(ascii: "\\"):
                    guard let escaped = peek else { return nil }
                    index += 1
                    out.append(escaped)
                default:
                    out.append(byte)
                }
            }
            return nil
        }
    }
}
