import NIOConcurrencyHelpers
import NIOCore

/// Tells interested parties that a client connection closed, with one
/// callback on the channel's close future per connection, however many
/// requests it serves.
///
/// A follower waiting for a fill must wake when its client goes away, so it
/// releases its descriptor at once. Hanging a callback on the close future
/// per request would keep every closure (and what it holds) until the
/// connection closes: a keep-alive connection serving thousands of blob
/// reads would pile them up. Here a follower registers for the time of its
/// request and deregisters when it is done.
final class CloseWatch: Sendable {
    private struct State {
        var closed = false
        var next = 0
        var callbacks: [Int: @Sendable () -> Void] = [:]
    }

    private let state = NIOLockedValueBox(State())

    init(_ channel: any Channel) {
        channel.closeFuture.whenComplete { [weak self] _ in self?.fire() }
    }

    /// Runs `callback` when the connection closes (at once if it has).
    /// Returns a token for `cancel`.
    func onClose(_ callback: @escaping @Sendable () -> Void) -> Int {
        let (token, closed) = state.withLockedValue { state -> (Int, Bool) in
            state.next += 1
            if !state.closed { state.callbacks[state.next] = callback }
            return (state.next, state.closed)
        }
        if closed { callback() }
        return token
    }

    func cancel(_ token: Int) {
        _ = state.withLockedValue { $0.callbacks.removeValue(forKey: token) }
    }

    private func fire() {
        let callbacks = state.withLockedValue { state -> [@Sendable () -> Void] in
            state.closed = true
            defer { state.callbacks = [:] }
            return Array(state.callbacks.values)
        }
        for callback in callbacks { callback() }
    }
}
