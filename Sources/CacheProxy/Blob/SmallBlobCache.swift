import DequeModule
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// The bytes of small cached blobs (configs, tiny layers), kept in memory.
///
/// For a blob of a few KiB, opening, reading and closing the file costs more
/// than sending it (measured: the hit path spent most of its time in those
/// syscalls). Blobs are immutable and named by digest, so an entry never
/// goes stale; it only has to go when the file does. Eviction is first-in,
/// first-out within a byte budget: cheap, and small blobs are cheap to
/// reload.
final class SmallBlobCache: Sendable {
    struct Entry: Sendable {
        let bytes: ByteBuffer
        /// The headers of a plain 200 answer, built once.
        let headers: HTTPHeaders
        /// That answer's head as HTTP/1.1 bytes, for the fast path
        /// (`HitFrontHandler`), which writes ahead of NIO's encoder.
        let responseHead: ByteBuffer

        init(bytes: ByteBuffer, headers: HTTPHeaders) {
            self.bytes = bytes
            self.headers = headers
            var head = ByteBuffer()
            head.writeStaticString("HTTP/1.1 200 OK\r\n")
            for (name, value) in headers {
                head.writeString(name)
                head.writeStaticString(": ")
                head.writeString(value)
                head.writeStaticString("\r\n")
            }
            head.writeStaticString("\r\n")
            self.responseHead = head
        }
    }

    private struct State {
        var entries: [Digest: Entry] = [:]
        var order: Deque<Digest> = []
        var bytes = 0
    }

    let maxBlobSize: Int
    let capacity: Int
    private let state = NIOLockedValueBox(State())

    init(maxBlobSize: Int = 64 * 1024, capacity: Int = 64 * 1024 * 1024) {
        self.maxBlobSize = maxBlobSize
        self.capacity = capacity
    }

    func get(_ digest: Digest) -> Entry? {
        state.withLockedValue { $0.entries[digest] }
    }

    func put(_ digest: Digest, _ bytes: ByteBuffer) {
        guard bytes.readableBytes <= maxBlobSize, capacity > 0 else { return }
        let entry = Entry(
            bytes: bytes,
            headers: BlobResponsePlan.headers(for: digest, length: Int64(bytes.readableBytes), contentType: nil))
        state.withLockedValue { state in
            guard state.entries[digest] == nil else { return }
            state.entries[digest] = entry
            state.order.append(digest)
            state.bytes += bytes.readableBytes
            while state.bytes > capacity, let oldest = state.order.popFirst() {
                state.bytes -= state.entries.removeValue(forKey: oldest)?.bytes.readableBytes ?? 0
            }
        }
    }

    func remove(_ digest: Digest) {
        state.withLockedValue { state in
            if let gone = state.entries.removeValue(forKey: digest) {
                state.bytes -= gone.bytes.readableBytes
                state.order.removeAll { $0 == digest }
            }
        }
    }
}
