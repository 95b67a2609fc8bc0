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
/// `Authorization`; its yes is remembered per (upstream, credential,
/// repository) for the upstream's `access_cache_ttl`, so a hit whose answer
/// is remembered costs one keyed hash and one dictionary lookup, on the
/// event loop. Checks of the same triple in flight at once share one `HEAD`.
///
/// Credentials are held only as an HMAC under a key made at start and never
/// written anywhere, so neither a memory dump of this table nor a log line
/// gives a usable secret, and a restart forgets every decision.
public final class AccessGate: Sendable {
    /// What a client gets.
    enum Verdict: Sendable {
        case allowed
        /// The upstream's refusal, passed to the client with its headers
        /// (`WWW-Authenticate` included, so clients run their token dance).
        case refused(HTTPResponseStatus, HTTPHeaders)
        /// The upstream could not be asked and the offline policy says no.
        case unreachable(OCIError)
    }

    struct Key: Hashable {
        let upstream: String
        let credential: CredentialHash
        let repository: String
    }

    /// 128 bits of an HMAC-SHA256: enough to tell credentials apart, short
    /// enough to hash fast.
    struct CredentialHash: Hashable {
        let high: UInt64
        let low: UInt64
    }

    private struct Entry {
        /// Until when the upstream's yes is believed without asking again.
        var freshUntil: ContinuousClock.Instant
    }

    private struct State {
        /// Triples the upstream said yes to; stale entries stay (until the
        /// table is full) as the memory the offline policy serves from.
        var allowed: [Key: Entry] = [:]
        var inFlight: [Key: Task<Verdict, Never>] = [:]
    }

    private let state = NIOLockedValueBox(State())
    /// An HMAC under a key made at start, never stored or shown.
    private let template = HMAC<SHA256>(key: SymmetricKey(size: .bits256))
    private let client: UpstreamClient
    private let metrics: ProxyMetrics
    /// Bound on remembered triples: a client sending a new token per request
    /// must not grow the table without end.
    let capacity: Int

    init(client: UpstreamClient, metrics: ProxyMetrics, capacity: Int = 65536) {
        self.client = client
        self.metrics = metrics
        self.capacity = capacity
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

    func key(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
             memo: CredentialMemo? = nil) -> Key {
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
        return Key(upstream: upstream.host, credential: credential, repository: repository)
    }

    /// Whether the client may have the blob without asking anyone: checks
    /// are off for this upstream, or the upstream's yes is still fresh. The
    /// hit path on the event loop serves only then; otherwise it hands the
    /// request to the async side, which calls `check`.
    func allowsNow(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
                   memo: CredentialMemo? = nil) -> Bool {
        guard upstream.accessCheck == .always else { return true }
        let key = key(upstream: upstream, headers: headers, repository: repository, memo: memo)
        let fresh = state.withLockedValue { $0.allowed[key].map { $0.freshUntil > .now } ?? false }
        if fresh { metrics.accessChecks["remembered"]?.increment() }
        return fresh
    }

    /// Asks the upstream unless its answer is remembered.
    func check(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String,
               digest: Digest) async -> Verdict {
        guard upstream.accessCheck == .always else { return .allowed }
        let key = key(upstream: upstream, headers: headers, repository: repository)
        let now = ContinuousClock.now
        let (task, remembered): (Task<Verdict, Never>?, Bool) = state.withLockedValue { state in
            if let entry = state.allowed[key], entry.freshUntil > now { return (nil, true) }
            if let running = state.inFlight[key] { return (running, false) }
            let task = Task { await self.ask(upstream: upstream, headers: headers, repository: repository,
                                             digest: digest, key: key) }
            state.inFlight[key] = task
            return (task, false)
        }
        guard let task else {
            if remembered { metrics.accessChecks["remembered"]?.increment() }
            return .allowed
        }
        return await task.value
    }

    /// Records a yes the upstream gave some other way: a fill's own `GET`
    /// with these credentials answered 2xx.
    func remember(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String) {
        guard upstream.accessCheck == .always else { return }
        let key = key(upstream: upstream, headers: headers, repository: repository)
        allow(key, ttl: upstream.accessCacheTTL)
    }

    private func allow(_ key: Key, ttl: Double) {
        let until = ContinuousClock.now + .milliseconds(Int64(ttl * 1000))
        state.withLockedValue { state in
            if state.allowed.count >= capacity, state.allowed[key] == nil {
                // Full: forget the stale entries first; if that is not
                // enough, everything (a flood of fresh credentials). Each
                // forgotten triple costs one more HEAD, never a wrong answer.
                let now = ContinuousClock.now
                state.allowed = state.allowed.filter { $0.value.freshUntil > now }
                if state.allowed.count >= capacity { state.allowed.removeAll(keepingCapacity: true) }
            }
            state.allowed[key] = Entry(freshUntil: until)
        }
    }

    private func ask(upstream: ProxyConfig.Upstream, headers: HTTPHeaders, repository: String, digest: Digest,
                     key: Key) async -> Verdict {
        defer { state.withLockedValue { _ = $0.inFlight.removeValue(forKey: key) } }
        var request = HTTPClientRequest(url: "\(upstream.origin)/v2/\(repository)/blobs/\(digest)")
        request.method = .HEAD
        // The client's credentials and nothing else of its request: its
        // Host, Range or forwarding headers are not the check's business.
        request.headers = BlobResponder.upstreamHeaders(headers)
        let failure: OCIError
        do {
            let response = try await client.send(request, to: upstream)
            metrics.upstreamResponse(upstream: upstream.host, code: Int(response.status.code))
            let code = response.status.code
            switch code {
            case 200..<400:
                allow(key, ttl: upstream.accessCacheTTL)
                metrics.accessChecks["allowed"]?.increment()
                return .allowed
            case 429, 500...:
                // The upstream is there but will not say (rate-limited,
                // failing): treated like one that cannot be reached.
                failure = OCIError(.badGateway, .unavailable,
                                   "the upstream registry could not confirm access (status \(code))")
            default:
                metrics.accessChecks["refused"]?.increment()
                return .refused(response.status, PassThrough.endToEnd(response.headers))
            }
        } catch {
            metrics.upstreamResponse(upstream: upstream.host, code: 0)
            client.logger.notice("access check failed", metadata: [
                "upstream": "\(upstream.host)", "error": "\(error)"])
            failure = UpstreamClient.clientError(for: error)
        }
        let before = upstream.offline == .serve && state.withLockedValue { $0.allowed[key] != nil }
        metrics.accessChecks[before ? "offline_served" : "offline_refused"]?.increment()
        return before ? .allowed : .unreachable(failure)
    }
}
