import DequeModule
import NIOCore

/// The bytes of a fill that could not go to disk, from the oldest any
/// follower still needs to the newest received: batches in order, each at
/// its offset in the blob. Followers take slices (shared storage, no copy);
/// a batch leaves when every follower is past it.
struct MemoryWindow {
    /// Bytes a fill may hold in memory; beyond it, the fill waits for its
    /// slowest follower (and so reads the upstream no faster).
    static let capacity = 4 * 1024 * 1024

    private var batches: Deque<(offset: Int64, bytes: ByteBuffer)> = []
    private(set) var bytes = 0
    /// The end of the furthest batch that left: a request starting below it
    /// would miss bytes.
    private(set) var droppedEnd: Int64 = 0
    /// The memory the batches' buffers take (their capacity).
    var retained: Int { batches.reduce(0) { $0 + $1.bytes.capacity } }
    var droppedAny: Bool { droppedEnd > 0 }

    mutating func append(_ batch: ByteBuffer, at offset: Int64) {
        guard batch.readableBytes > 0 else { return }
        var kept = batch
        // A partial batch (a trickling upstream's, flushed) in a whole
        // batch's buffer: the bound counts bytes, so the window keeps a copy
        // of the bytes' size rather than the megabyte around them.
        if batch.capacity > 2 * batch.readableBytes {
            kept = ByteBufferAllocator().buffer(capacity: batch.readableBytes)
            kept.writeImmutableBuffer(batch)
        }
        batches.append((offset, kept))
        bytes += batch.readableBytes
    }

    /// Whether some batch is needed by none of `needs` (each follower's
    /// bytes still to send: from its position to the end of its range).
    func canTrim(keeping needs: [Range<Int64>]) -> Bool {
        batches.contains { batch in !Self.isNeeded(batch.offset, batch.bytes.readableBytes, by: needs) }
    }

    /// Drops every batch no follower needs. A follower of a bounded range
    /// that waits for the digest before its last byte pins only the batch
    /// holding that byte, so it never holds the window shut.
    mutating func trim(keeping needs: [Range<Int64>]) {
        batches.removeAll { batch in
            guard !Self.isNeeded(batch.offset, batch.bytes.readableBytes, by: needs) else { return false }
            bytes -= batch.bytes.readableBytes
            droppedEnd = max(droppedEnd, batch.offset + Int64(batch.bytes.readableBytes))
            return true
        }
    }

    private static func isNeeded(_ offset: Int64, _ count: Int, by needs: [Range<Int64>]) -> Bool {
        let span = offset..<(offset + Int64(count))
        return needs.contains { $0.overlaps(span) }
    }

    /// Whether a follower starting at `offset` finds every byte it needs
    /// from there on: below `fileEnd` they are in the file, above it none
    /// may have left.
    func holds(from offset: Int64, fileEnd: Int64) -> Bool {
        droppedEnd <= max(offset, fileEnd)
    }

    /// The bytes from `offset` to at most `end`, within one batch; nil if
    /// `offset` is not held (dropped, or not received yet).
    func bytes(from offset: Int64, upTo end: Int64) -> ByteBuffer? {
        for batch in batches {
            let batchEnd = batch.offset + Int64(batch.bytes.readableBytes)
            guard offset >= batch.offset, offset < batchEnd else { continue }
            let length = Int(min(end, batchEnd) - offset)
            guard length > 0 else { return nil }
            return batch.bytes.getSlice(at: batch.bytes.readerIndex + Int(offset - batch.offset), length: length)
        }
        return nil
    }
}
