import NIOConcurrencyHelpers
import NIOHTTP1

/// The last digests the upstream named for each tag: what a pull by tag is
/// answered from while the upstream cannot be asked (DESIGN.md, Offline
/// memory). Written to the storage folder with the grants and links
/// (`AccessMemory`).
///
/// A tag may name a different manifest for each `Accept` (an index for a
/// current client, a single-platform manifest for an old Docker), so a tag
/// keeps its last digest per media type, most recent first; offline, a
/// client gets the most recent one it accepts.
public final class TagTable: Sendable {
    struct Key: Hashable, Sendable {
        let upstream: String
        let repository: String
        let tag: String
    }

    struct Entry: Equatable, Sendable {
        let digest: Digest
        let mediaType: MediaType

        /// `If-None-Match` naming this manifest, for a tag's `HEAD` that
        /// expects it (`TagLookup.expected`).
        var entityTag: String { "\"\(digest)\"" }

        /// Whether the upstream's answer to a `HEAD` that expected this
        /// manifest says the tag still names it: a 304, unless it names
        /// another digest (contradicting itself, it is not believed).
        func isConfirmed(by status: HTTPResponseStatus, digestField: String?) -> Bool {
            guard status == .notModified else { return false }
            guard let digestField else { return true }
            return (try? Digest(parsing: Substring(digestField))) == digest
        }

        /// What a 200 naming this manifest would have said of it: the
        /// answer the async side takes for a confirming 304.
        var namedHeaders: HTTPHeaders {
            HTTPHeaders([("docker-content-digest", digest.description), ("content-type", mediaType.value)])
        }
    }

    /// One tag and its entries, as saved and loaded.
    struct Row: Equatable, Sendable {
        let key: Key
        let entries: [Entry]
    }

    private struct State {
        var tags: [Key: [Entry]] = [:]
        var changed = false
    }

    /// Media types kept per tag: the manifest kinds clients ask for.
    static let typesPerTag = 4

    private let state: NIOLockedValueBox<State>
    let capacity: Int

    init(capacity: Int = 65536, remembered: [Row] = []) {
        self.capacity = capacity
        var state = State()
        for row in remembered.prefix(capacity) {
            state.tags[row.key] = Array(row.entries.prefix(Self.typesPerTag))
        }
        self.state = NIOLockedValueBox(state)
    }

    /// The upstream named `digest` for the tag just now; `superseding`:
    /// the manifest the pull expected (`expected`), of a type the client
    /// named. Unless the answer is an index and the expected was not, the
    /// upstream would have named that one again had the tag still named
    /// it, so it is gone from the tag: an index left behind when a tag
    /// moved to a single manifest would otherwise be expected (and served
    /// offline) first for good. An index answering a client that named
    /// both kinds says nothing of the single manifest expected before the
    /// index was known: clients naming no index still get that one.
    func record(_ key: Key, digest: Digest, mediaType: MediaType, superseding expected: Entry? = nil) {
        let entry = Entry(digest: digest, mediaType: mediaType)
        let capacity = self.capacity
        state.withLockedValue { state in
            var entries = state.tags[key] ?? []
            let stale = expected.flatMap { expected in
                expected != entry && (expected.mediaType.isIndex || !mediaType.isIndex)
                    ? entries.firstIndex(of: expected) : nil
            }
            if let stale { entries.remove(at: stale) }
            guard stale != nil || entries.first != entry else { return }  // a renewal is not worth a write
            if state.tags[key] == nil, state.tags.count >= capacity {
                // Full: a quarter goes, in hash order (effectively at
                // random). A forgotten tag costs an offline pull, never a
                // wrong answer.
                for victim in Array(state.tags.keys.prefix(max(1, capacity / 4))) { state.tags[victim] = nil }
            }
            if let known = entries.firstIndex(where: { $0.mediaType.essence == mediaType.essence }) {
                // Clients that accept different types take turns: the same
                // digest again is no news (and no write of the memory).
                guard entries[known] != entry || stale != nil else { return }
                entries.remove(at: known)
            }
            entries.insert(entry, at: 0)
            state.tags[key] = Array(entries.prefix(Self.typesPerTag))
            state.changed = true
        }
    }

    /// Forgets every tag of an upstream that now points elsewhere.
    func forget(upstream host: String) {
        state.withLockedValue { state in
            let before = state.tags.count
            state.tags = state.tags.filter { $0.key.upstream != host }
            if before != state.tags.count { state.changed = true }
        }
    }

    /// The tag is gone upstream for the types a client sending `accept`
    /// takes (a 404 to a client allowed the repository; registries also
    /// answer 404 when the tag is there in a type the client does not
    /// take, so entries of other types stay).
    func remove(_ key: Key, accept: [String]) {
        state.withLockedValue { state in
            guard let entries = state.tags[key] else { return }
            let kept = entries.filter { !$0.mediaType.isAccepted(by: accept) }
            guard kept.count != entries.count else { return }
            state.tags[key] = kept.isEmpty ? nil : kept
            state.changed = true
        }
    }

    /// The digests to answer a client sending `accept` with, best first:
    /// of the types it takes, an index first (it lets every client pick
    /// its own platform; a single-platform manifest named for another
    /// client's `Accept` may be another machine's), then the most recent.
    /// The caller serves the first one it still holds and may serve.
    func candidates(_ key: Key, accept: [String]) -> [Entry] {
        let accepted = (state.withLockedValue { $0.tags[key] } ?? []).filter { $0.mediaType.isAccepted(by: accept) }
        return accepted.filter(\.mediaType.isIndex) + accepted.filter { !$0.mediaType.isIndex }
    }

    /// The first of `candidates` of the types `accepted` takes (for a pull
    /// by tag: the types its client names, `MediaType.isNamed`): the
    /// manifest the pull expects the upstream to name again
    /// (`TagLookup.expected`). Without the lists `candidates` builds: this
    /// runs on every pull by tag.
    func expected(_ key: Key, accepted: (MediaType) -> Bool) -> Entry? {
        guard let entries = state.withLockedValue({ $0.tags[key] }) else { return nil }
        var recent: Entry?
        for entry in entries where accepted(entry.mediaType) {
            if entry.mediaType.isIndex { return entry }
            if recent == nil { recent = entry }
        }
        return recent
    }

    /// The manifest a tag's `HEAD` for a `method` pull expects, asking with
    /// `headers` (the client's, as they go upstream): `expected` of the
    /// types their `Accept` names, written into them as `If-None-Match`.
    /// Nil, adding nothing, for a `HEAD` (its answer is the upstream's own
    /// headers, which a 304 leaves out). One place for the loop's lookup
    /// through the decoder and the async side's own `HEAD`.
    func expect(_ key: Key, method: HTTPMethod, headers: inout HTTPHeaders) -> Entry? {
        guard method == .GET else { return nil }
        let accept = headers["accept"]
        guard let expected = expected(key, accepted: { $0.isNamed(by: accept) }) else { return nil }
        headers.add(name: "if-none-match", value: expected.entityTag)
        return expected
    }

    /// The table, when it changed since the last call (or `always`).
    func snapshot(always: Bool = false) -> [Row]? {
        state.withLockedValue { state in
            guard state.changed || always else { return nil }
            state.changed = false
            return state.tags.map { Row(key: $0.key, entries: $0.value) }
        }
    }

    /// The last snapshot was not written: the next one is taken again.
    func markChanged() {
        state.withLockedValue { $0.changed = true }
    }
}
