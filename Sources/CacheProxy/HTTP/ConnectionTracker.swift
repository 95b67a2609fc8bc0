import NIOConcurrencyHelpers
import NIOCore

/// Knows which client connections are idle (between requests), so that a
/// graceful shutdown can close those at once and let busy ones finish their
/// current response. Its draining flag is also what `/readyz` reports: the
/// server stops being ready exactly when it starts draining.
final class ConnectionTracker: Sendable {
    private struct Entry {
        let channel: any Channel
        /// Answers in progress: more than one for a moment when the hit fast
        /// path starts the next answer before the async side has marked the
        /// previous one done, so a busy mark is never undone by a late idle.
        var busy = 0
    }

    private struct Table {
        var entries: [ObjectIdentifier: Entry] = [:]
        var draining = false
    }

    private let table = NIOLockedValueBox(Table())

    /// Registers a connection; returns false when shutdown already began.
    func add(_ channel: any Channel) -> Bool {
        table.withLockedValue { table in
            guard !table.draining else { return false }
            table.entries[ObjectIdentifier(channel)] = Entry(channel: channel)
            return true
        }
    }

    func remove(_ channel: any Channel) {
        table.withLockedValue { _ = $0.entries.removeValue(forKey: ObjectIdentifier(channel)) }
    }

    /// Marks a connection busy or idle. Returns false when the connection
    /// should close instead of waiting for another request (shutdown began).
    @discardableResult
    func setIdle(_ channel: any Channel, _ idle: Bool) -> Bool {
        table.withLockedValue { table in
            // Through the index, not `entries[id]?.busy = …`: that optional
            // chain's accessor allocated on every call (twice a hit).
            if let index = table.entries.index(forKey: ObjectIdentifier(channel)) {
                table.entries.values[index].busy = max(0, table.entries.values[index].busy + (idle ? -1 : 1))
            }
            return !table.draining
        }
    }

    var isDraining: Bool { table.withLockedValue { $0.draining } }

    /// Starts draining: idle connections are closed now, busy ones after
    /// their current response.
    func drain() {
        let idle = table.withLockedValue { table -> [any Channel] in
            table.draining = true
            return table.entries.values.filter { $0.busy == 0 }.map(\.channel)
        }
        for channel in idle { channel.close(promise: nil) }
    }

    /// Closes every connection, busy or not (shutdown timeout passed).
    func closeAll() {
        let all = table.withLockedValue { $0.entries.values.map(\.channel) }
        for channel in all { channel.close(promise: nil) }
    }
}
