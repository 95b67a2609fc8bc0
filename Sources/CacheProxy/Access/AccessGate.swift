import AsyncHTTPClient
import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import ProxyMetrics

/// Decides whether a client may read a cached blob (or join a fill someone
/// else started): only when the upstream would serve it this blob from this
/// repository (DESIGN.md, Security).
///
/// The upstream is asked with a `HEAD` of the blob carrying the client's own
/// `Authorization`. A 2xx says two things, remembered apart for the
/// upstream's `access_cache_ttl`:
/// - a *grant*: this credential may pull from this repository at this
///   upstream (registries authorize per repository);
/// - a *link*: this blob belongs to this repository at this upstream
///   (registries serve a blob only through a repository that holds it).
/// A client gets a cached blob without asking when both are fresh: a new
/// credential pulling a cached image costs one `HEAD`, not one per layer,
/// while a grant for `alice/x` never opens a blob that only `corp/secret`
/// holds, and a blob cached through one upstream is never served through
/// another that does not have it. With `access_check: never` only the link
/// is required (no credential check, but still no blob from elsewhere).
///
/// Remembered answers are read on the event loop (the hit path): one
/// keyed hash per connection and credential, two lookups under a lock.
/// Checks of the same (credential, repository, digest) in flight at once
/// share one `HEAD`.
///
/// Credentials are held only as an HMAC under the storage folder's key
/// (`AccessMemory`), so neither a memory dump of this table, the memory file
/// nor a log line gives a usable secret. The tables are written to the
/// folder (`snapshotIfChanged`) and loaded at start as stale entries: a
/// restart forgets what is fresh, not what the offline policy serves from.
public final class AccessGate: Sendable {
    /// What a client gets.
    enum Verdict: Sendable {
        case allowed
        /// The upstream could not be asked, and it allowed this before
        /// (`offline: serve`).
        case allowedOffline
        /// The upstream's refusal, passed to the client with its headers
        /// (`WWW-Authenticate` included, so clients run their token dance;
        /// hop-by-hop ones are dropped where it is sent,
        /// `BlobResponder.sendUpstreamAnswer`).
        case refused(HTTPResponseStatus, HTTPHeaders)
        /// The upstream could not be asked and the offline policy says no.
        case unreachable(OCIError)
    }

    struct Grant: Hashable {
        let upstream: String
        let credential: CredentialHash
        let repository: String
    }

    /// A blob and a manifest of the same digest are told apart: a check
    /// asks the registry path of its kind, and a 404 from one path must
    /// not end what the other said.
    struct Link: Hashable {
        let upstream: String
        let repository: String
        let digest: Digest
        var kind: ContentKind = .blob
    }

    /// 128 bits of an HMAC-SHA256: enough to tell credentials apart, short
    /// enough to hash fast.
    struct CredentialHash: Hashable {
        let high: UInt64
        let low: UInt64
    }

    private struct State {
        /// Until when each yes is believed. Stale entries stay (until a
        /// table is full) as the memory the offline policy serves from.
        var grants: [Grant: ContinuousClock.Instant] = [:]
        var links: [Link: ContinuousClock.Instant] = [:]
        var inFlight: [Pair: Task<Verdict, Never>] = [:]
        /// The tables changed since the last snapshot.
        var changed = false
    }

    private struct Pair: Hashable {
        let grant: Grant
        let link: Link
    }

    private let state: NIOLockedValueBox<State>
    /// An HMAC under the folder's key, never shown.
    private let template: HMAC<SHA256>
    private let client: UpstreamClient
    private let metrics: ProxyMetrics
    /// Bound on each table: a client sending a new token per request must
    /// not grow them without end.
    let capacity: Int

    /// `key` hashes credentials; `remembered` is what an earlier run
    /// learnt, taken as stale (fresh for no one, served only offline).
    init(client: UpstreamClient, metrics: ProxyMetrics, capacity: Int = 65536,
         key: SymmetricKey = SymmetricKey(size: .bits256), remembered: AccessMemory.Snapshot = .init()) {
        self.client = client
        self.metrics = metrics
        self.capacity = capacity
        self.template = HMAC<SHA256>(key: key)
        var state = State()
        let loaded = ContinuousClock.now
        for grant in remembered.grants.prefix(capacity) { state.grants[grant] = loaded }
        for link in remembered.links.prefix(capacity) { state.links[link] = loaded }
        self.state = NIOLockedValueBox(state)
    }

    /// Forgets every answer of an upstream (`host`) that now points
    /// elsewhere (a reload changed its registry, access check or account):
    /// the old registry's yeses are not the new one's.
    func forget(upstream host: String) {
        state.withLockedValue { state in
            let (grants, links) = (state.grants.count, state.links.count)
            state.grants = state.grants.filter { $0.key.upstream != host }
            state.links = state.links.filter { $0.key.upstream != host }
            if grants != state.grants.count || links != state.links.count { state.changed = true }
        }
    }

    /// The last snapshot was not written: the next call takes them again.
    func markChanged() {
        state.withLockedValue { $0.changed = true }
    }

    /// The tables, when they changed since the last call: what
    /// `AccessMemory.save` writes.
    func snapshotIfChanged(always: Bool = false) -> AccessMemory.Snapshot? {
        state.withLockedValue { state in
            guard state.changed || always else { return nil }
            state.changed = false
            return AccessMemory.Snapshot(grants: Array(state.grants.keys), links: Array(state.links.keys))
        }
    }

    /// The last credential seen on one connection and its hash: a client
    /// sends the same `Authorization` with every request of a pull, so the
    /// hit path hashes it once per connection, not once per request.
    /// Confined to the connection's event loop (`RequestFrontHandler`).
    final class CredentialMemo {
        fileprivate var values: [String] = []
        fileprivate var hash: CredentialHash?
        init() {}
    }

    func grant(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
               memo: CredentialMemo? = nil) -> Grant {
        // `headers[name]`, not `[canonicalForm:]`: the latter splits values
        // at commas character by character, which on a 1 KiB token cost a
        // third of the hit path's throughput.
        let values = headers["authorization"]
        let credential: CredentialHash
        if let memo, let hash = memo.hash, memo.values == values {
            credential = hash
        } else {
            var mac = template  // the key is already mixed in: a copy, not a new HMAC
            for var value in values {
                value.withUTF8 { mac.update(data: UnsafeRawBufferPointer($0)) }
                mac.update(data: [0])
            }
            credential = mac.finalize().withUnsafeBytes { bytes in
                CredentialHash(high: bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                               low: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            }
            memo?.values = values
            memo?.hash = credential
        }
        return Grant(upstream: upstream.host, credential: credential, repository: repository)
    }

    /// Whether the client may have the blob without asking anyone: the
    /// upstream's yes for this credential, repository and blob is still
    /// fresh. The hit path on the event loop serves only then; otherwise it
    /// hands the request to the async side, which calls `check`.
    func allowsNow(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String, digest: Digest,
                   kind: ContentKind = .blob, memo: CredentialMemo? = nil) -> Bool {
        let grant = upstream.accessCheck == .always
            ? self.grant(upstream: upstream, headers: headers, repository: repository, memo: memo) : nil
        return isFresh(Link(upstream: upstream.host, repository: repository, digest: digest, kind: kind), grant)
    }

    /// Asks the upstream unless its answer is remembered.
    func check(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
               digest: Digest, kind: ContentKind) async -> Verdict {
        let pair = Pair(grant: grant(upstream: upstream, headers: headers, repository: repository),
                        link: Link(upstream: upstream.host, repository: repository, digest: digest, kind: kind))
        if isFresh(pair.link, upstream.accessCheck == .always ? pair.grant : nil) { return .allowed }
        let task: Task<Verdict, Never> = state.withLockedValue { state in
            if let running = state.inFlight[pair] { return running }
            let task = Task { await self.ask(upstream: upstream, headers: headers, pair: pair) }
            state.inFlight[pair] = task
            return task
        }
        return await task.value
    }

    /// Whether the link, and the grant when one is needed, are fresh.
    private func isFresh(_ link: Link, _ grant: Grant?) -> Bool {
        let now = ContinuousClock.now
        let fresh = state.withLockedValue { state in
            guard let linked = state.links[link], linked > now else { return false }
            guard let grant else { return true }
            return state.grants[grant].map { $0 > now } ?? false
        }
        if fresh { metrics.accessRemembered.increment() }
        return fresh
    }

    /// Records a yes the upstream gave some other way: a fill's own `GET`
    /// with these credentials answered 2xx.
    func remember(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String, digest: Digest,
                  kind: ContentKind, memo: CredentialMemo? = nil) {
        let pair = Pair(grant: grant(upstream: upstream, headers: headers, repository: repository, memo: memo),
                        link: Link(upstream: upstream.host, repository: repository, digest: digest, kind: kind))
        allow(pair, ttl: upstream.accessCacheTTL)
    }

    private func allow(_ pair: Pair, ttl: Double) {
        let now = ContinuousClock.now
        let until = now + .milliseconds(Int64(ttl * 1000))
        let capacity = self.capacity
        state.withLockedValue { state in
            Self.makeRoom(in: &state.grants, for: pair.grant, capacity: capacity, now: now)
            Self.makeRoom(in: &state.links, for: pair.link, capacity: capacity, now: now)
            // Only a new fact is worth a write; a renewal is not.
            if state.grants.updateValue(until, forKey: pair.grant) == nil { state.changed = true }
            if state.links.updateValue(until, forKey: pair.link) == nil { state.changed = true }
        }
    }

    /// A full table forgets its stale entries first; if that is not enough
    /// (a flood of fresh credentials), a quarter of the rest, in hash order
    /// (effectively at random). Each forgotten answer costs one more
    /// `HEAD`, never a wrong answer.
    private static func makeRoom<K: Hashable>(in table: inout [K: ContinuousClock.Instant], for key: K,
                                              capacity: Int, now: ContinuousClock.Instant) {
        guard table.count >= capacity, table[key] == nil else { return }
        table = table.filter { $0.value > now }
        if table.count >= capacity {
            for victim in Array(table.keys.prefix(max(1, capacity / 4))) { table[victim] = nil }
        }
    }

    private func ask(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, pair: Pair) async -> Verdict {
        let kind = pair.link.kind
        defer { state.withLockedValue { _ = $0.inFlight.removeValue(forKey: pair) } }
        let digest = pair.link.digest
        var request = HTTPClientRequest(
            url: "\(upstream.origin)/v2/\(pair.link.repository)/\(kind.pathSegment)/\(digest)")
        request.method = .HEAD
        // The client's credentials (and, for a manifest, what it accepts)
        // and nothing else of its request: its Host, Range or forwarding
        // headers are not the check's business.
        request.headers = BlobResponder.upstreamHeaders(headers, kind: kind)
        let failure: OCIError
        do {
            let response = try await client.send(request, to: upstream)
            metrics.upstreamAnswered(upstream, method: .HEAD, response: response)
            let code = response.status.code
            switch code {
            case 200..<300:
                allow(pair, ttl: upstream.accessCacheTTL)
                metrics.accessChecks["allowed"]?.increment()
                return .allowed
            case 300..<400 where kind == .blob
                && Self.isBlobRedirect(response.headers.first(name: "location"), digest: digest):
                // Blob storage behind the registry (S3, a CDN): a yes.
                allow(pair, ttl: upstream.accessCacheTTL)
                metrics.accessChecks["allowed"]?.increment()
                return .allowed
            case 300..<400 where kind == .manifest:
                // A registry that redirects its manifests (registry.k8s.io
                // sends every request elsewhere) says nothing about access
                // here: the client gets the redirect and follows it, as it
                // did before manifests were cached. Nothing is forgotten.
                metrics.accessChecks["refused"]?.increment()
                return .refused(response.status, response.headers)
            case 429, 500...:
                // The upstream is there but will not say (rate-limited,
                // failing): treated like one that cannot be reached.
                failure = OCIError(.badGateway, .unavailable,
                                   "the upstream registry could not confirm access (status \(code))")
            default:
                // A no also ends what was remembered: a revoked credential
                // or a deleted blob is not served later from the offline
                // memory.
                state.withLockedValue { state in
                    // A 404 ends the link only when this credential may read
                    // the repository: registries answer 404 to hide private
                    // repositories, and a stranger must not erase what
                    // everyone else relies on.
                    // A grant known only from before a restart (stale) is
                    // not proof enough to keep the link against a 404, nor
                    // to keep itself: both go.
                    if code == 404, let granted = state.grants[pair.grant] {
                        if state.links.removeValue(forKey: pair.link) != nil { state.changed = true }
                        if granted <= .now, state.grants.removeValue(forKey: pair.grant) != nil { state.changed = true }
                    } else {
                        if state.grants.removeValue(forKey: pair.grant) != nil { state.changed = true }
                    }
                }
                metrics.accessChecks["refused"]?.increment()
                return .refused(response.status, response.headers)
            }
        } catch {
            metrics.upstreamAnswered(upstream, method: .HEAD, response: nil)
            client.logger.notice("access check failed", metadata: [
                "upstream": "\(upstream.host)", "error": "\(error)"])
            failure = UpstreamClient.clientError(for: error)
        }
        let before = upstream.offline == .serve && wasAllowed(pair, upstream: upstream)
        metrics.accessChecks[before ? "offline_served" : "offline_refused"]?.increment()
        return before ? .allowedOffline : .unreachable(failure)
    }

    /// The upstream refused this client a tag of `repository` (its own
    /// `HEAD`, with the client's credentials): a 401 or 403 ends the
    /// credential's grant, as a refused access check does. Returns whether
    /// the credential held a grant before, which makes a 404 the
    /// repository's word (a tag gone) rather than a registry hiding a
    /// private repository from a stranger.
    func refused(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
                 status: HTTPResponseStatus) -> Bool {
        let grant = grant(upstream: upstream, headers: headers, repository: repository)
        let now = ContinuousClock.now
        return state.withLockedValue { state in
            // Fresh: a grant known only from before a restart does not
            // make a 404 the repository's word.
            let held = state.grants[grant].map { $0 > now } ?? false
            if status == .unauthorized || status == .forbidden, state.grants.removeValue(forKey: grant) != nil {
                state.changed = true
            }
            return held
        }
    }

    /// Whether the upstream allowed this before, fresh or stale: what the
    /// offline policy serves from.
    private func wasAllowed(_ pair: Pair, upstream: ProxyConfig.Upstream) -> Bool {
        state.withLockedValue { state in
            state.links[pair.link] != nil && (upstream.accessCheck == .never || state.grants[pair.grant] != nil)
        }
    }

    /// Whether the upstream ever allowed this client `digest` from
    /// `repository` (for a tag answered from the offline table: the
    /// upstream cannot be asked, so only what it said before counts).
    func allowedBefore(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
                       digest: Digest, kind: ContentKind) -> Bool {
        wasAllowed(Pair(grant: grant(upstream: upstream, headers: headers, repository: repository),
                        link: Link(upstream: upstream.host, repository: repository, digest: digest, kind: kind)),
                   upstream: upstream)
    }

    /// A redirect counts as a yes only when it hands the blob to its
    /// storage (a path that names the digest, as S3 and CDN URLs do), not
    /// when it sends the client to a login page (which may name the digest
    /// in its query, as a return address, and so is not looked at), nor to
    /// another registry API (`/v2/...`: a redirector such as
    /// registry.k8s.io answers for any repository without checking
    /// anything). A redirect that is not a yes reaches the client as the
    /// upstream's answer, and the client follows it past the cache.
    static func isBlobRedirect(_ location: String?, digest: Digest) -> Bool {
        guard let location, let target = RedirectTarget(location, relativeTo: "http://upstream.invalid/") else {
            return false
        }
        let afterAuthority = target.url.dropFirst(target.scheme.count + 3).drop { $0 != "/" }
        let path = afterAuthority.prefix { $0 != "?" && $0 != "#" }
        return path.contains(digest.hex) && !path.hasPrefix("/v2/")
    }
}
