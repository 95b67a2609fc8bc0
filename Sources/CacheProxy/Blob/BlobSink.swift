import Crypto
import NIOCore

/// Where a fill pours the upstream body: gathers it into batches, and hashes
/// and writes one batch while the caller reads the next.
///
/// Chunks arrive as the socket delivers them (tens of KiB). Writing each one
/// would cost a hop to the thread pool and a wake-up of every follower per
/// chunk; taking turns between reading, hashing and writing would leave two
/// of the three idle at any moment. Measured on a cold 64 MiB blob: ~180 ms
/// one chunk at a time, ~120 ms batched and overlapped (origin alone ~25 ms;
/// SHA-256 of 64 MiB alone ~35 ms here).
struct BlobSink {
    static let batchSize = 256 * 1024

    private let writer: any BlobWriter
    private let fd: CInt
    private var hasher: DigestHasher
    private var pending = ByteBuffer()
    private var writing: (task: Task<DigestHasher, Error>, count: Int64)?
    /// Bytes handed to writes so far.
    private var offset: Int64 = 0

    init(writer: any BlobWriter, fd: CInt, algorithm: Digest.Algorithm) {
        self.writer = writer
        self.fd = fd
        self.hasher = DigestHasher(algorithm)
    }

    /// Takes a chunk. Returns how many bytes have newly reached the file
    /// (a batch finished), 0 if none.
    mutating func append(_ chunk: ByteBuffer) async throws -> Int64 {
        pending.writeImmutableBuffer(chunk)
        guard pending.readableBytes >= Self.batchSize else { return 0 }
        return try await startWrite()
    }

    /// Writes what is left and waits for it. Returns the bytes that newly
    /// reached the file, and the digest's hex.
    mutating func finish() async throws -> (written: Int64, hex: String) {
        var written = try await startWrite()
        written += try await awaitWrite()
        return (written, hasher.finalizeHex())
    }

    /// Waits for a write in progress, ignoring its outcome: the descriptor is
    /// about to be closed, and no write may still use its number.
    mutating func abandon() async {
        if let (task, _) = writing { _ = try? await task.value }
        writing = nil
    }

    /// Waits for the previous batch, then starts writing the pending one.
    private mutating func startWrite() async throws -> Int64 {
        let written = try await awaitWrite()
        guard pending.readableBytes > 0 else { return written }
        let (batch, at, writer, fd, state) = (pending, offset, writer, fd, hasher)
        writing = (Task {
            var state = state
            state.update(batch)
            try await writer.write(batch, to: fd, at: at)
            return state
        }, Int64(batch.readableBytes))
        offset += Int64(batch.readableBytes)
        pending = ByteBuffer()
        pending.reserveCapacity(Self.batchSize + 64 * 1024)
        return written
    }

    private mutating func awaitWrite() async throws -> Int64 {
        guard let (task, count) = writing else { return 0 }
        writing = nil
        do {
            hasher = try await task.value
        } catch {
            throw FillStateMachine.Failure.storage(String(describing: error))
        }
        return count
    }
}

/// An incremental hash of the algorithm a digest names.
struct DigestHasher: Sendable {
    private var sha256: SHA256?
    private var sha512: SHA512?

    init(_ algorithm: Digest.Algorithm) {
        switch algorithm {
        case .sha256: sha256 = SHA256()
        case .sha512: sha512 = SHA512()
        }
    }

    mutating func update(_ buffer: ByteBuffer) {
        buffer.withUnsafeReadableBytes { bytes in
            sha256?.update(bufferPointer: bytes)
            sha512?.update(bufferPointer: bytes)
        }
    }

    func finalizeHex() -> String {
        let bytes: [UInt8]
        if let sha256 { bytes = Array(sha256.finalize()) } else if let sha512 { bytes = Array(sha512.finalize()) } else { bytes = [] }
        let digits = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
