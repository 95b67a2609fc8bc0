import Crypto

extension Digest {
    /// Whether `bytes` hash to this digest (for bytes already in memory;
    /// downloads hash as they stream, in `BlobSink`).
    func matches<Bytes: Sequence>(_ bytes: Bytes) -> Bool where Bytes.Element == UInt8 {
        let data = Array(bytes)
        let computed: [UInt8]
        switch algorithm {
        case .sha256: computed = Array(SHA256.hash(data: data))
        case .sha512: computed = Array(SHA512.hash(data: data))
        }
        let digits = Array("0123456789abcdef".utf8)
        var text = [UInt8]()
        text.reserveCapacity(computed.count * 2)
        for byte in computed {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0f)])
        }
        return text.elementsEqual(hex.utf8)
    }
}
