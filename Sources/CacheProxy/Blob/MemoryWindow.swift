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
    /// A batch left that a request starting now would have needed.
    private(set) var droppedAny = false

    /// Offset of the oldest byte held.
    var start: Int64 { batches.first?.offset ?? .max }

    mutating func append(_ batch: ByteBuffer, at offset: Int64) {
        guard batch.readableBytes > 0 else { return }
        batches.append((offset, batch))
        bytes += batch.readableBytes
    }

    /// Whether some batch ends at or below `position`.
    func canTrim(below position: Int64) -> Bool {
        guard let first = batches.first else { return false }
        return first.offset + Int64(first.bytes.readableBytes) <= position
    }

    /// Drops the batches that end at or below `position`.
    mutating func trim(below position: Int64) {
        while canTrim(below: position), let first = batches.popFirst() {
            bytes -= first.bytes.readableBytes
            droppedAny = true
        }
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
