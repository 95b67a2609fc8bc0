import AsyncHTTPClient
import NIOConcurrencyHelpers
import NIOCore

/// Reading an upstream response body under the idle timeout
/// (`timeouts.upstream_idle`): the body may take as long as it likes while
/// bytes keep coming, and is given up when none came for the limit.
///
/// A watchdog task looks at a progress counter every quarter of the limit
/// instead of racing a timer against every read: the read loop pays one
/// uncontended lock per chunk, and a stall is found within 1¼ × the limit.
/// Time the reader spends handing a chunk on (to a slow client) or waiting
/// for the disk to take the previous batch is paused out: those waits
/// belong to the send timeout and to the disk, never to the upstream.
enum UpstreamBody {
    static func read<T: Sendable>(idle limit: Duration,
                                  _ work: @escaping @Sendable (IdleClock) async throws -> T) async throws -> T {
        let clock = IdleClock()
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask { try await work(clock) }
            group.addTask {
                try await clock.watch(limit: limit)
                return nil
            }
            defer { group.cancelAll() }
            while let result = try await group.next() {
                if let result { return result }
            }
            throw UpstreamFailure.idle
        }
    }

    /// Reads a small body (an error answer, a token): at most `limit` bytes: at most `limit` bytes, within the idle
    /// timeout between reads and `total` in all. Stopping early drops the
    /// rest (AsyncHTTPClient then closes that connection): an error body
    /// that is large or trickles must not keep every client of the digest
    /// waiting for its head.
    static func collect(_ body: HTTPClientResponse.Body, limit: Int, idle: Duration,
                               total: Duration) async throws -> ByteBuffer {
        let started = ContinuousClock.now
        return try await UpstreamBody.read(idle: idle) { clock in
            var collected = ByteBuffer()
            for try await var chunk in body {
                clock.tick()
                let room = limit - collected.readableBytes
                if chunk.readableBytes > room { chunk = chunk.getSlice(at: chunk.readerIndex, length: room) ?? ByteBuffer() }
                collected.writeBuffer(&chunk)
                if collected.readableBytes >= limit || ContinuousClock.now - started >= total { break }
            }
            return collected
        }
    }
}

/// Progress of one body read, for `UpstreamBody`'s watchdog.
final class IdleClock: Sendable {
    private struct State {
        var ticks: UInt64 = 0
        /// Pauses in progress: a disk wait may hold a memory-window wait
        /// inside it, and the inner one's end must not restart the clock.
        var pauses = 0
    }

    private let state = NIOLockedValueBox(State())

    /// Bytes arrived.
    func tick() {
        state.withLockedValue { $0.ticks &+= 1 }
    }

    /// Runs `body` with the clock stopped (the wait is not the upstream's).
    func paused<T>(_ body: () async throws -> T) async rethrows -> T {
        state.withLockedValue { $0.pauses += 1 }
        defer { state.withLockedValue { $0.pauses -= 1; $0.ticks &+= 1 } }
        return try await body()
    }

    /// Returns never; throws `UpstreamFailure.idle` when no tick came for
    /// `limit`, or CancellationError when the read is over.
    func watch(limit: Duration) async throws {
        let step = limit / 4
        var last = state.withLockedValue { $0.ticks }
        var still = Duration.zero
        while true {
            try await Task.sleep(for: step)
            let (ticks, paused) = state.withLockedValue { ($0.ticks, $0.pauses > 0) }
            if ticks != last || paused {
                last = ticks
                still = .zero
            } else {
                still += step
                if still >= limit { throw UpstreamFailure.idle }
            }
        }
    }
}
