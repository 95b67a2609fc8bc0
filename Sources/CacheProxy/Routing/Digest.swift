/// A validated content digest (`<algorithm>:<hex>`).
///
/// Only digests built through `init?(parsing:)` exist, so every file path the
/// blob store derives from one is made of a known algorithm name and lowercase
/// hex: nothing a client sends can steer a path outside the storage folder.
public struct Digest: Hashable, Sendable, CustomStringConvertible {
    public enum Algorithm: String, Sendable, CaseIterable {
        case sha256
        case sha512

        /// Length of the hex encoding of this algorithm's output.
        public var hexLength: Int {
            switch self {
            case .sha256: return 64
            case .sha512: return 128
            }
        }
    }

    public let algorithm: Algorithm
    public let hex: String

    /// `hex`: lower-case hex of the algorithm's length (checked by the caller).
    private init(algorithm: Algorithm, hex: UnsafeBufferPointer<UInt8>) {
        self.algorithm = algorithm
        self.hex = String(decoding: hex, as: UTF8.self)
    }

    private init(algorithm: Algorithm, hex: StaticString) {
        self = hex.withUTF8Buffer { Digest(algorithm: algorithm, hex: $0) }
    }

    /// The digest of zero bytes: the one blob an empty file can be.
    static func empty(_ algorithm: Algorithm) -> Digest {
        switch algorithm {
        case .sha256:
            return Digest(algorithm: .sha256, hex: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        case .sha512:
            let hex: StaticString = """
                cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
                47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e
                """
            return Digest(algorithm: .sha512, hex: hex)
        }
    }

    /// Why a digest string was refused; the text goes into the OCI error body.
    public enum ParseError: Error, Equatable, Sendable {
        case missingSeparator
        case unsupportedAlgorithm(String)
        case badEncoding
    }

    public init(parsing text: Substring) throws(ParseError) {
        // Byte by byte, not by `Character`: a digest is ASCII or refused.
        let parsed = text.utf8.withContiguousStorageIfAvailable(Self.parse)
            ?? Array(text.utf8).withUnsafeBufferPointer(Self.parse)
        self = try parsed.get()
    }

    /// A digest read from its text's bytes: what `init(parsing:)` does,
    /// for a caller that holds the bytes already (`RequestTarget`).
    static func parse(_ text: UnsafeBufferPointer<UInt8>) -> Result<Digest, ParseError> {
        guard let colon = text.firstIndex(of: UInt8(ascii: ":")) else { return .failure(.missingSeparator) }
        let algorithmName = UnsafeBufferPointer(rebasing: text[..<colon])
        let algorithm: Algorithm
        if algorithmName.hasBytes("sha256") {
            algorithm = .sha256
        } else if algorithmName.hasBytes("sha512") {
            algorithm = .sha512
        } else {
            return .failure(.unsupportedAlgorithm(String(String(decoding: algorithmName, as: UTF8.self).prefix(32))))
        }
        let hex = text[(colon + 1)...]
        guard hex.count == algorithm.hexLength,
              hex.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x61 && $0 <= 0x66) })
        else { return .failure(.badEncoding) }
        return .success(Digest(algorithm: algorithm, hex: UnsafeBufferPointer(rebasing: hex)))
    }

    public init(parsing text: String) throws(ParseError) {
        try self.init(parsing: Substring(text))
    }

    public var description: String { "\(algorithm.rawValue):\(hex)" }
}

extension Digest.ParseError: CustomStringConvertible {
    public var description: String {
        switch self {
        case .missingSeparator: return "digest must be <algorithm>:<hex>"
        case .unsupportedAlgorithm(let name): return "unsupported digest algorithm \"\(name)\" (sha256, sha512 are)"
        case .badEncoding: return "digest hex part has the wrong length or is not lowercase hex"
        }
    }
}
