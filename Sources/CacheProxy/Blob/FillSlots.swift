import DequeModule
import NIOConcurrencyHelpers
import Prometheus

/// The bound on one upstream's concurrent downloads (`upstreams[].max_fills`).
///
/// Why a bound of the proxy's own, beside the HTTP client's pool: fills run
/// as long as the upstream keeps sending, and a client that leaves does not
/// stop one, so without a bound a burst of large misses (a CI farm starting
/// many pulls at once, or anyone who can reach the proxy, on purpose) holds
/// as many upstream connections as it likes. Fills past the bound wait here
/// in arrival order; the queue itself is bounded too, and a wait ends
/// after `timeouts.upstream` (from the client's side the upstream has not
/// answered), or as soon as every client of the waiting fill has left.
///
/// The control plane (the `/v2/` ping, manifests, tokens, access checks)
/// never waits here: it has its own HTTP client (`UpstreamClient.Pool`).
final class FillSlots: Sendable {
    enum Outcome: Sendable, Equatable {
        case granted
        /// The queue is full: answered at once, 503.
        case queueFull
        /// Waited `timeouts.upstream` without a slot: 503.
        case timedOut
        /// Every client of the fill left, or the fill was cancelled.
        case withdrawn
    }

    private struct Waiter {
        let id: Int
        let continuation: CheckedContinuation<Outcome, Never>
    }

    private struct State {
        var inUse = 0
        /// The most slots ever in use at once (diagnostics and tests).
        var peak = 0
        var waiting = Deque<Waiter>()

        mutating func take() {
            inUse += 1
            peak = max(peak, inUse)
        }
    }

    let capacity: Int
    let queueLimit: Int
    private let state = NIOLockedValueBox(State())
    private let waitingGauge: Gauge

    init(capacity: Int, queueLimit: Int, waitingGauge: Gauge) {
        self.capacity = capacity
        self.queueLimit = queueLimit
        self.waitingGauge = waitingGauge
    }

    /// Takes a slot, waiting up to `timeout` for one. `id` names the wait
    /// for `withdraw`; `stillWanted` is asked once the wait is queued, so a
    /// withdrawal that came before it is not lost. A `granted` slot must be
    /// given back with `release`.
    func acquire(id: Int, timeout: Duration, stillWanted: @escaping @Sendable () -> Bool) async -> Outcome {
        let immediate: Outcome? = state.withLockedValue { state in
            if state.inUse < capacity && state.waiting.isEmpty {
                state.take()
                return .granted
            }
            return state.waiting.count >= queueLimit ? .queueFull : nil
        }
        if let immediate { return immediate }
        let timer = Task { [weak self] in
            try await Task.sleep(for: timeout)
            self?.end(id, with: .timedOut)
        }
        defer { timer.cancel() }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let settled = state.withLockedValue { state -> Outcome? in
                    // A slot may have come free between the two looks, or
                    // others may have filled the queue.
                    if state.inUse < capacity && state.waiting.isEmpty {
                        state.take()
                        return .granted
                    }
                    if state.waiting.count >= queueLimit { return .queueFull }
                    state.waiting.append(Waiter(id: id, continuation: continuation))
                    waitingGauge.increment()  // before anyone can end the wait
                    return nil
                }
                if let settled {
                    continuation.resume(returning: settled)
                    return
                }
                if Task.isCancelled || !stillWanted() { end(id, with: .withdrawn) }
            }
        } onCancel: {
            self.end(id, with: .withdrawn)
        }
    }

    /// Whether fills are waiting: a running fill whose clients all left
    /// then gives its slot up (`Fill.run`).
    var hasWaiters: Bool { state.withLockedValue { !$0.waiting.isEmpty } }

    /// The most downloads that ever ran at once.
    var peakInUse: Int { state.withLockedValue { $0.peak } }

    /// Ends the wait `id` with `withdrawn`, if it is still waiting.
    func withdraw(_ id: Int) {
        end(id, with: .withdrawn)
    }

    /// Gives a slot back: to the first waiter, if any.
    func release() {
        let next = state.withLockedValue { state -> Waiter? in
            if let next = state.waiting.popFirst() { return next }  // the slot passes on
            state.inUse -= 1
            return nil
        }
        if let next {
            waitingGauge.decrement()
            next.continuation.resume(returning: .granted)
        }
    }

    private func end(_ id: Int, with outcome: Outcome) {
        let waiter = state.withLockedValue { state -> Waiter? in
            guard let index = state.waiting.firstIndex(where: { $0.id == id }) else { return nil }
            return state.waiting.remove(at: index)
        }
        if let waiter {
            waitingGauge.decrement()
            waiter.continuation.resume(returning: outcome)
        }
    }
}
