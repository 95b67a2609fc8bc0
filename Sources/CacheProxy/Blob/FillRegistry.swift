import NIOConcurrencyHelpers
import NIOHTTP1
import ProxyMetrics

/// One fill per upstream and digest to join: the first miss starts it,
/// every later miss for the same digest through the same upstream joins it
/// (a client refused through someone else's fill may start a second one,
/// see `fill(for:...)`). Also keeps the fills' tasks, so that shutdown can
/// wait for them, and each upstream's download bound (`FillSlots`).
///
/// Why per upstream: a client of upstream A must never wait on upstream
/// B's download of the same digest. B may be slow, hostile, or (with
/// `insecure: true`) anyone on its path; A's clients get A's speed. Only the
/// verified, published file is shared (content addressing makes that safe),
/// behind each client's own access check.
public final class FillRegistry: Sendable {
    /// A manifest request never joins a blob's fill of the same digest:
    /// the two ask different registry paths, and only a manifest's fill
    /// keeps the media type.
    struct Key: Hashable {
        let upstream: String
        let digest: Digest
        var kind: ContentKind = .blob
    }

    private struct Running {
        var fills: [Key: Fill] = [:]
        var tasks: [ObjectIdentifier: Task<Void, Never>] = [:]
        /// Fills whose task ended before it was recorded.
        var endedEarly: Set<ObjectIdentifier> = []
    }

    private let running = NIOLockedValueBox(Running())
    private let context: FillContext
    private let holdBack: Int64
    /// Each upstream's download bound, by its `host` (a reload replaces
    /// the bound of an upstream whose `max_fills` changed; fills running
    /// keep the one they started with).
    private let slots: NIOLockedValueBox<[String: FillSlots]>

    /// Fills past an upstream's bound wait in a queue this many times the
    /// bound; more get 503 at once.
    static let queueFactor = 4

    init(context: FillContext, upstreams: [ProxyConfig.Upstream], holdBack: Int64 = 64 * 1024) {
        self.context = context
        self.holdBack = holdBack
        self.slots = NIOLockedValueBox(Self.slots(for: upstreams, keeping: [:], metrics: context.metrics))
    }

    private static func slots(for upstreams: [ProxyConfig.Upstream], keeping old: [String: FillSlots],
                              metrics: ProxyMetrics) -> [String: FillSlots] {
        var slots: [String: FillSlots] = [:]
        for upstream in upstreams {
            if let kept = old[upstream.host], kept.capacity == upstream.maxFills {
                slots[upstream.host] = kept
                continue
            }
            slots[upstream.host] = FillSlots(capacity: upstream.maxFills,
                                             queueLimit: upstream.maxFills * Self.queueFactor,
                                             waitingGauge: metrics.fillsWaiting(upstream: upstream.host))
        }
        return slots
    }

    /// A reload: the download bounds of the upstreams configured now.
    func update(upstreams: [ProxyConfig.Upstream]) {
        let metrics = context.metrics
        slots.withLockedValue { $0 = Self.slots(for: upstreams, keeping: $0, metrics: metrics) }
    }

    enum Lookup {
        /// The blob was published meanwhile: serve it from the store.
        case cached
        /// The fill to follow; `joined` tells whether this caller is a
        /// coalesced follower of a fill someone else started.
        case fill(Fill, joined: Bool)
    }

    /// The fill for `digest`, started now if none is running, unless the
    /// blob has just been published. A fill publishes (index first) before
    /// it leaves this registry, so a caller that missed the index a moment
    /// ago finds the blob here instead of starting a second download.
    ///
    /// `ownUnlessAnswered`: a caller whose joined fill was refused for
    /// someone else's credentials does not join another fill the upstream
    /// has not answered yet (it could be refused the same way, again and
    /// again, by a client that keeps starting refused fills): it starts its
    /// own, which takes the digest's place here. A fill already streaming
    /// is joined as usual. The fill it displaces runs on for its own
    /// followers; temporary files are per fill, and publishing the same
    /// verified blob twice replaces a file by an identical one.
    func fill(for digest: Digest, kind: ContentKind = .blob, upstream: ProxyConfig.Upstream, repository: String,
              headers: HTTPHeaders, ownUnlessAnswered: Bool = false) -> Lookup {
        let key = Key(upstream: upstream.host, digest: digest, kind: kind)
        let found = running.withLockedValue { running -> (fill: Fill, created: Bool)? in
            if let existing = running.fills[key] {
                let state = existing.state  // read once: it may move on meanwhile
                if case .published = state { return nil }
                let unanswered = state == .idle || state == .requesting
                // A failed or refused fill may linger for a moment after it
                // woke its followers; a new request must not join it. Nor
                // one whose disk failed and whose first bytes have left its
                // memory: the newcomer gets a fill of its own.
                if !state.isFinished && existing.isJoinable && !(ownUnlessAnswered && unanswered) {
                    return (existing, false)
                }
            } else if context.store.size(of: digest) != nil {
                return nil
            }
            let fill = Fill(digest: digest, kind: kind, upstream: upstream, repository: repository,
                            requestHeaders: headers, holdBack: holdBack)
            running.fills[key] = fill
            return (fill, true)
        }
        guard let (fill, created) = found else { return .cached }
        if created {
            context.metrics.fillsInFlight.increment()
            let (context, slots) = (self.context, self.slots.withLockedValue { $0[upstream.host] })
            if let slots { fill.queue(on: slots) }
            let id = ObjectIdentifier(fill)
            let task = Task {
                await fill.run(context, slots: slots)
                self.finished(fill)
            }
            running.withLockedValue { running in
                // The task may have ended before it was recorded. (A fill
                // displaced meanwhile still runs: it is recorded too.)
                if running.endedEarly.remove(id) == nil { running.tasks[id] = task }
            }
        }
        return .fill(fill, joined: !created)
    }

    /// The most downloads `upstream` (its `host`) ever ran at once.
    func peakDownloads(of upstream: String) -> Int {
        slots.withLockedValue { $0[upstream] }?.peakInUse ?? 0
    }

    /// The fill in flight for `digest` through `upstream`, if any, up to
    /// and including the moment it is published.
    func running(_ digest: Digest, upstream: ProxyConfig.Upstream, kind: ContentKind) -> Fill? {
        running.withLockedValue { $0.fills[Key(upstream: upstream.host, digest: digest, kind: kind)] }
    }

    private func finished(_ fill: Fill) {
        let key = Key(upstream: fill.upstream.host, digest: fill.digest, kind: fill.kind)
        running.withLockedValue { running in
            if running.fills[key] === fill { running.fills[key] = nil }
            if running.tasks.removeValue(forKey: ObjectIdentifier(fill)) == nil {
                running.endedEarly.insert(ObjectIdentifier(fill))
            }
        }
        context.metrics.fillsInFlight.decrement()
    }

    /// Waits for every fill running now (used by graceful shutdown).
    public func drain() async {
        let tasks = running.withLockedValue { Array($0.tasks.values) }
        for task in tasks { await task.value }
    }

    /// Whether any fill is running.
    public var isBusy: Bool { running.withLockedValue { !$0.tasks.isEmpty } }

    /// Stops every fill: their temporary files are deleted on the way out.
    public func cancelAll() {
        for task in running.withLockedValue({ Array($0.tasks.values) }) { task.cancel() }
    }
}
