import DequeModule
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// The bytes of small cached blobs (configs, tiny layers) and manifests,
/// kept in memory, each with the headers of its plain 200 answer. A blob and
/// a manifest of the same digest are the same bytes but not the same answer
/// (a manifest carries its media type), so the kind is part of the key.
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

    struct Key: Hashable {
        let digest: Digest
        let kind: ContentKind
    }

    private struct State {
        var entries: [Key: Entry] = [:]
        var order: Deque<Key> = []
        var bytes = 0
    }

    let maxBlobSize: Int
    let capacity: Int
    private let state = NIOLockedValueBox(State())

    init(maxBlobSize: Int = 64 * 1024, capacity: Int = 64 * 1024 * 1024) {
        self.maxBlobSize = maxBlobSize
        self.capacity = capacity
    }

    func get(_ digest: Digest, kind: ContentKind = .blob) -> Entry? {
        state.withLockedValue { $0.entries[Key(digest: digest, kind: kind)] }
    }

    /// `contentType`: a manifest's media type (none for a blob).
    func put(_ digest: Digest, _ bytes: ByteBuffer, kind: ContentKind = .blob, contentType: String? = nil) {
        guard bytes.readableBytes <= maxBlobSize, capacity > 0 else { return }
        let key = Key(digest: digest, kind: kind)
        let entry = Entry(
            bytes: bytes,
            headers: BlobResponsePlan.headers(for: digest, length: Int64(bytes.readableBytes), contentType: contentType))
        state.withLockedValue { state in
            guard state.entries[key] == nil else { return }
            state.entries[key] = entry
            state.order.append(key)
            state.bytes += bytes.readableBytes
            while state.bytes > capacity, let oldest = state.order.popFirst() {
                state.bytes -= state.entries.removeValue(forKey: oldest)?.bytes.readableBytes ?? 0
            }
        }
    }

    /// Both kinds: the file behind them is gone.
    func remove(_ digest: Digest) {
        state.withLockedValue { state in
            for kind in [ContentKind.blob, .manifest] {
                let key = Key(digest: digest, kind: kind)
                if let gone = state.entries.removeValue(forKey: key) {
                    state.bytes -= gone.bytes.readableBytes
                    state.order.removeAll { $0 == key }
                }
            }
        }
    }
}
