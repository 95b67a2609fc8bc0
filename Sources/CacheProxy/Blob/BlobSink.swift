import Crypto
import NIOCore

/// Where a fill pours the upstream body: gathers it into batches, and hashes
/// and writes one batch while the caller reads the next.
///
/// Chunks arrive as the upstream connection delivers them: a read burst of
/// up to 1 MiB from `FillDownload`, tens of KiB from AsyncHTTPClient. Writing each one
/// would cost a hop to the storage backend and a wake-up of every follower
/// per chunk; taking turns between reading, hashing and writing would leave
/// two of the three idle at any moment. Measured on a cold 64 MiB blob:
/// ~180 ms one chunk at a time, ~120 ms batched and overlapped.
///
/// A batch is 1 MiB: each costs a write's round trip through the backend
/// (a wake-up of its worker and of the fill's task) and a wake-up and a
/// `sendfile` per follower, and at 256 KiB those were a fifth of a cold
/// fill's CPU (`benchmarks/miss.py`: 2.8–3.8 against 2.1–2.6 CPU s/GB). The
/// two buffers (one filling, one being written) are allocated once per fill
/// and reused, so a fill holds 2 MiB however large its blob, and the
/// allocator sees two allocations per fill, not one per batch. A blob whose
/// length the upstream gave gets buffers no larger than what is left of it
/// (a 2 KB manifest, 2 KB).
///
/// Bytes do not wait long for a batch to fill:
/// - A chunk that comes `flushAfter` or more after the last batch was
///   handed on goes out at once, in an unfilled batch, and is waited for:
///   the clients of an upstream that trickles get its bytes as they come,
///   not a megabyte at a time (at 20 KB/s, every 50 s).
/// - After the upstream paused (`flushAfter` or more between the sink
///   being ready and the next chunk; time spent on its own writes is not a
///   pause), and from the body's start, chunks go out one by one until a
///   batch's worth has gone that way. An upstream writes a burst after a
///   pause (a window's worth per round trip), which the socket delivers in
///   several reads, and the burst's tail must not wait for the next pause.
/// A fast upstream pays a megabyte of small writes at its start, then
/// fills a batch well within `flushAfter` and is never flushed.
/// - An empty chunk says the upstream paused: `FillDownload` sends one
///   when no bytes came for `flushAfter`, and what is left of a burst
///   longer than a batch goes out then. (A download without a connection
///   of its own goes through AsyncHTTPClient, which says nothing of
///   pauses: a redirected one, or one from an upstream with an account;
///   there that tail waits for the next chunk.)
///
/// A batch becomes readable by followers as soon as its write completes
/// (the write's task tells the fill), not when the sink next looks: an
/// upstream that sends a megabyte and then pauses has that megabyte reach
/// its clients during the pause.
///
/// When a write fails (a full disk, an I/O error), or there was no file to
/// begin with, the sink goes on without the disk: each batch is hashed and
/// handed to the fill's memory window (`Fill.spill`), which followers read
/// from and which pushes back on the upstream when full. The hash survives
/// the switch, so the blob is still verified before its last byte goes out.
struct BlobSink {
    /// A power of two: NIO rounds a buffer's capacity up to one, and a
    /// chunk that would carry a batch past it is split at the boundary.
    static let batchSize = 1024 * 1024
    static let flushAfter: Duration = .milliseconds(50)

    private let writer: any BlobWriter
    /// nil once the disk is out of the picture.
    private var fd: CInt?
    private let fill: Fill
    private let clock: IdleClock
    private var hasher: DigestHasher
    private var pending = ByteBuffer()
    /// When the last batch was handed on (or the sink began).
    private var handedOn = ContinuousClock.now
    /// The body's length, when the upstream said it.
    private let expectedLength: Int64?
    private let flushAfter: Duration
    /// The buffer of the last finished write, empty, for the next batch.
    private var spare: ByteBuffer?
    private var writing: (task: Task<WriteResult, Never>, batch: ByteBuffer, at: Int64)?
    /// Bytes handed on (to writes or to memory) so far.
    private var offset: Int64 = 0
    /// Bytes handed on chunk by chunk since the upstream last paused (or
    /// the body began); nil while batching.
    private var sincePause: Int?
    /// When the sink was last ready for a chunk: after the writes it
    /// waited for, so that a slow disk is not taken for a pause.
    private var readyAt = ContinuousClock.now

    private struct WriteResult: Sendable {
        var hasher: DigestHasher
        /// The disk's error: the batch goes to memory instead.
        var error: (any Error)?
        /// The fill's verdict on the batch's bytes (a body longer than
        /// said): the fill fails.
        var failure: (any Error)?
    }

    init(writer: any BlobWriter, fd: CInt?, fill: Fill, clock: IdleClock, algorithm: Digest.Algorithm,
         expectedLength: Int64? = nil, flushAfter: Duration = BlobSink.flushAfter, startChunkByChunk: Bool = true) {
        self.sincePause = startChunkByChunk ? 0 : nil
        self.expectedLength = expectedLength
        self.flushAfter = flushAfter
        self.writer = writer
        self.fd = fd
        self.fill = fill
        self.clock = clock
        self.hasher = DigestHasher(algorithm)
    }

    /// Takes a chunk.
    mutating func append(_ chunk: ByteBuffer) async throws {
        let arrived = ContinuousClock.now
        // An empty chunk is a pause told (`FillDownload`): it may come
        // late here if the disk held the sink, but it is a pause all the same.
        if chunk.readableBytes == 0 || arrived - readyAt >= flushAfter { sincePause = 0 }
        defer { readyAt = .now }
        var chunk = chunk
        while chunk.readableBytes > 0 {
            // An empty buffer is recycled here rather than when its write
            // ended: by now the backend's thread has surely dropped its
            // reference, so `clear` keeps the storage instead of allocating.
            if pending.readableBytes == 0 { pending.clear(minimumCapacity: bufferCapacity) }
            let room = Self.batchSize - pending.readableBytes
            if chunk.readableBytes <= room {
                pending.writeBuffer(&chunk)
            } else if var head = chunk.readSlice(length: room) {
                pending.writeBuffer(&head)
            }
            if pending.readableBytes >= Self.batchSize { try await startBatch() }
        }
        guard pending.readableBytes > 0 else { return }
        if let handed = sincePause {
            let count = pending.readableBytes
            try await flush()
            sincePause = handed + count >= Self.batchSize ? nil : handed + count
        } else if arrived - handedOn >= flushAfter {
            try await flush()
        }
    }

    /// Hands the unfilled batch on and waits for it. The hand-on counts
    /// from the write's end: a write slower than `flushAfter` must not make
    /// every next chunk look late.
    private mutating func flush() async throws {
        try await startBatch()
        try await awaitWrite()
        handedOn = .now
    }

    /// A batch's room: a whole batch, or what is left of a body of known
    /// length (a longer body than said grows the buffer; neither HTTP
    /// client hands on bytes past the `Content-Length` anyway).
    private var bufferCapacity: Int {
        guard let expectedLength else { return Self.batchSize }
        return Int(max(0, min(Int64(Self.batchSize), expectedLength - offset)))
    }

    /// Hands on what is left and waits for it. Returns the digest's hex.
    mutating func finish() async throws -> String {
        try await startBatch()
        try await awaitWrite()
        return hasher.finalizeHex()
    }

    /// Waits for a write in progress, ignoring its outcome: the descriptor is
    /// about to be closed, and no write may still use its number.
    mutating func abandon() async {
        if let writing { _ = await writing.task.value }
        writing = nil
    }

    /// Waits for the previous batch, then starts the pending one: a write
    /// that overlaps the next read, or, without a disk, a hash and a spill.
    private mutating func startBatch() async throws {
        try await awaitWrite()
        guard pending.readableBytes > 0 else { return }
        let batch = pending
        handedOn = .now
        let at = offset
        offset += Int64(batch.readableBytes)
        pending = spare ?? ByteBuffer()
        spare = nil
        guard let fd else {
            hasher.update(batch)
            try await fill.spill(batch, at: at, clock: clock)
            return
        }
        let (writer, state, fill) = (writer, hasher, fill)
        writing = (Task {
            var state = state
            state.update(batch)
            do { try await writer.write(batch, to: fd, at: at) } catch { return WriteResult(hasher: state, error: error) }
            do { try fill.written(Int64(batch.readableBytes)) } catch { return WriteResult(hasher: state, failure: error) }
            return WriteResult(hasher: state)
        }, batch, at)
    }

    private mutating func awaitWrite() async throws {
        guard var current = writing else { return }
        writing = nil
        // A slow disk (a long fsync of another fill on a shared thread
        // pool, say) is not a silent upstream: the wait is paused out of
        // `upstream_idle`.
        let result = await clock.paused { await current.task.value }
        hasher = result.hasher
        if let failure = result.failure { throw failure }
        if let error = result.error {
            // The file holds everything before this batch; from here on
            // followers read memory.
            fd = nil
            fill.storageFailed(error, fileEnd: current.at)
            try await fill.spill(current.batch, at: current.at, clock: clock)
        } else {
            // Kept for the next batch, emptied by moving the reader index
            // only (no write to the storage the backend may still hold).
            current.batch.moveReaderIndex(forwardBy: current.batch.readableBytes)
            spare = current.batch
        }
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
        buffer.withUnsafeReadableBytes { update($0) }
    }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        sha256?.update(bufferPointer: bytes)
        sha512?.update(bufferPointer: bytes)
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
