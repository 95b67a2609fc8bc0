import NIOCore

extension Digest {
    /// Whether `bytes` hash to this digest (for bytes already in memory;
    /// downloads hash as they stream, in `BlobSink`).
    func matches(_ bytes: ByteBuffer) -> Bool {
        var hasher = DigestHasher(algorithm)
        hasher.update(bytes)
        return hasher.finalizeHex() == hex
    }
}
