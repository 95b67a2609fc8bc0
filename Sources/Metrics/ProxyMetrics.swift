import NIOConcurrencyHelpers
import Prometheus

/// Every metric the proxy exposes, in one place, so that names, help texts
/// and label sets are defined once and `docs/metrics.md` can be checked
/// against a single file.
///
/// Labels are bounded by construction: `upstream` comes from the
/// configuration, `kind`, `method` and `source` from small enums, `code` from
/// HTTP status codes. Never an image name or a digest.
public final class ProxyMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry

    public let blobHits: Counter
    public let blobMisses: Counter
    public let coalescedFollowers: Counter
    public let manifestHits: Counter
    public let manifestMisses: Counter
    public let manifestsOffline: Counter
    public let tagPullsOnLoop: Counter
    public let digestMismatches: Counter
    public let fillFailures: Counter
    public let bytesFromCache: Counter
    public let bytesFromUpstream: Counter
    /// Cached bytes read on the thread pool because the page cache lacked
    /// them (every other hit byte goes by sendfile or from memory).
    public let coldReadBytes: Counter
    public let fillsInFlight: Gauge
    public let cacheSizeBytes: Gauge
    public let cacheEntries: Gauge
    public let cacheMaxSizeBytes: Gauge
    public let connectedClients: Gauge
    /// Client connections cut by a timeout, by which one.
    public let clientTimeouts: [String: Counter]
    /// Opening a cached blob failed for lack of descriptors or memory.
    public let fileOpenErrors: [String: Counter]
    /// Blobs removed by the size limit.
    public let evictions: Counter
    /// Storage errors during fills (the fill went on from memory), by errno.
    public let fillErrors: [String: Counter]
    public static let fillErrorReasons = ["enospc", "edquot", "eio", "erofs", "other"]
    /// Access checks of cache hits and joins, by how they were decided:
    /// `remembered` (an earlier yes still fresh), `allowed` / `refused` (the
    /// upstream's answer to a HEAD), `offline_served` / `offline_refused`
    /// (the upstream could not be asked).
    public let accessChecks: [String: Counter]
    /// `accessChecks["remembered"]`, which every hit counts, held apart.
    public let accessRemembered: Counter
    /// The series of the answers given most: a `GET` of a blob, and of a
    /// manifest, answered 200 (`requestSeries` hands them out unlocked).
    public let blobGetOK: RequestSeries
    public let manifestGetOK: RequestSeries
    /// A pull by tag's wait for its first byte, recorded on every pull:
    /// made at start like the two above, not looked up by a hashed name.
    private let manifestFirstByte: DurationHistogram
    public static let accessCheckResults = ["remembered", "allowed", "refused", "offline_served", "offline_refused"]
    private static let firstByteHelp = "Time from request head to response head."
    private static let accessCheckHelp = "Checks that a client may read a cached blob or join a fill, by result."

    /// Series looked up per request are kept here, so the hot path does one
    /// small dictionary lookup instead of the registry's name-and-label
    /// validation.
    private struct RequestKey: Hashable {
        let kind: String
        let method: String
        let code: Int
    }

    private let requestCounters = NIOLockedValueBox<[RequestKey: Counter]>([:])
    private struct HistogramKey: Hashable {
        let name: String
        let kind: String
    }

    private let histograms = NIOLockedValueBox<[HistogramKey: DurationHistogram]>([:])

    private struct UpstreamKey: Hashable {
        let upstream: String
        let method: String
        let code: Int
    }

    /// Looked up once per label set, as `requestCounters`: the registry's
    /// own `makeCounter` builds a descriptor and searches by label array,
    /// which on the tag path (one upstream `HEAD` per pull) cost ~2% of the
    /// CPU per request.
    private let upstreamCounters = NIOLockedValueBox<[UpstreamKey: Counter]>([:])
    private let rateLimitGauges = NIOLockedValueBox<[String: Gauge]>([:])

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        blobHits = registry.makeCounter(descriptor: Self.describe("cacheproxy_blob_hits_total", "Blob reads answered from a complete cached file."))
        blobMisses = registry.makeCounter(descriptor: Self.describe("cacheproxy_blob_misses_total", "Blob reads that started an upstream fill."))
        manifestHits = registry.makeCounter(descriptor: Self.describe("cacheproxy_manifest_hits_total", "Manifest reads (by digest, or by a tag the upstream or the offline table resolved) answered from the cache."))
        manifestMisses = registry.makeCounter(descriptor: Self.describe("cacheproxy_manifest_misses_total", "Manifest reads that started an upstream fill."))
        manifestsOffline = registry.makeCounter(descriptor: Self.describe("cacheproxy_manifest_offline_total", "Manifest reads answered from the cache while the upstream could not be asked (offline: serve); also counted as hits."))
        tagPullsOnLoop = registry.makeCounter(descriptor: Self.describe("cacheproxy_tag_pulls_on_loop_total", "Pulls by tag answered wholly on the event loop: the upstream's HEAD on the loop's own connection, the manifest from memory (or the upstream's headers, for a HEAD)."))
        coalescedFollowers = registry.makeCounter(descriptor: Self.describe("cacheproxy_blob_coalesced_total", "Blob reads that joined a fill already in flight instead of asking the upstream again."))
        digestMismatches = registry.makeCounter(descriptor: Self.describe("cacheproxy_digest_mismatches_total", "Fills whose bytes did not hash to the requested digest; nothing was stored."))
        fillFailures = registry.makeCounter(descriptor: Self.describe("cacheproxy_fill_failures_total", "Fills that failed: upstream cut or error, digest mismatch, or a disk failure with no client left to stream to."))
        bytesFromCache = registry.makeCounter(descriptor: Self.describe("cacheproxy_served_bytes_total", "Blob body bytes sent to clients, by where the blob was when the read began."), labels: [("source", "cache")])
        bytesFromUpstream = registry.makeCounter(descriptor: Self.describe("cacheproxy_served_bytes_total", "Blob body bytes sent to clients, by where the blob was when the read began."), labels: [("source", "upstream")])
        coldReadBytes = registry.makeCounter(descriptor: Self.describe("cacheproxy_cold_read_bytes_total", "Cached bytes read from disk on the thread pool because the page cache lacked them, instead of a sendfile that would have waited on an event loop."))
        fillsInFlight = registry.makeGauge(descriptor: Self.describe("cacheproxy_fills_in_flight", "Upstream blob downloads now running."))
        cacheSizeBytes = registry.makeGauge(descriptor: Self.describe("cacheproxy_cache_size_bytes", "Bytes of complete blobs in the cache folder."))
        cacheEntries = registry.makeGauge(descriptor: Self.describe("cacheproxy_cache_entries", "Complete blobs in the cache folder."))
        cacheMaxSizeBytes = registry.makeGauge(descriptor: Self.describe("cacheproxy_cache_max_size_bytes", "storage.max_size (0 when the cache has no size limit)."))
        connectedClients = registry.makeGauge(descriptor: Self.describe("cacheproxy_connected_clients", "Client connections now open."))
        clientTimeouts = Self.counters(in: registry, "cacheproxy_client_timeouts_total",
                                       "Client connections closed by a timeout, by which one.",
                                       label: "kind", values: ["head", "idle", "request_body", "send"])
        fileOpenErrors = Self.counters(in: registry, "cacheproxy_file_open_errors_total",
                                       "Cached blobs that could not be opened although present (out of descriptors or memory); answered 503.",
                                       label: "reason", values: ["emfile", "enfile", "enomem"])
        evictions = registry.makeCounter(descriptor: Self.describe("cacheproxy_evictions_total", "Blobs deleted to keep the cache under storage.max_size (least recently used first)."))
        fillErrors = Self.counters(in: registry, "cacheproxy_fill_errors_total",
                                   "Storage errors during fills (full disk, I/O error), by errno; the blob was not kept.",
                                   label: "reason", values: Self.fillErrorReasons)
        accessRemembered = registry.makeCounter(descriptor: Self.describe("cacheproxy_access_checks_total", Self.accessCheckHelp),
                                                labels: [("result", "remembered")])
        accessChecks = Self.counters(in: registry, "cacheproxy_access_checks_total", Self.accessCheckHelp,
                                     label: "result", values: Self.accessCheckResults)
        let blob = RequestKey(kind: "blob", method: "GET", code: 200)
        let manifest = RequestKey(kind: "manifest", method: "GET", code: 200)
        let countHelp = Self.describe("cacheproxy_requests_total", "Client requests by kind, method and response status.")
        let blobCount = registry.makeCounter(descriptor: countHelp, labels: [("kind", "blob"), ("method", "GET"), ("code", "200")])
        let manifestCount = registry.makeCounter(descriptor: countHelp,
                                                 labels: [("kind", "manifest"), ("method", "GET"), ("code", "200")])
        requestCounters.withLockedValue { $0 = [blob: blobCount, manifest: manifestCount] }
        let durationHelp = Self.describe("cacheproxy_request_duration_seconds",
                                         "Time from request head to the last response byte written.")
        let blobDuration = registry.makeDurationHistogram(descriptor: durationHelp, labels: [("kind", "blob")],
                                                          buckets: Self.durationBuckets)
        let manifestDuration = registry.makeDurationHistogram(descriptor: durationHelp, labels: [("kind", "manifest")],
                                                              buckets: Self.durationBuckets)
        let firstByte = registry.makeDurationHistogram(
            descriptor: Self.describe("cacheproxy_time_to_first_byte_seconds", Self.firstByteHelp),
            labels: [("kind", "manifest")], buckets: Self.durationBuckets)
        histograms.withLockedValue {
            $0 = [HistogramKey(name: "cacheproxy_request_duration_seconds", kind: "blob"): blobDuration,
                  HistogramKey(name: "cacheproxy_request_duration_seconds", kind: "manifest"): manifestDuration,
                  HistogramKey(name: "cacheproxy_time_to_first_byte_seconds", kind: "manifest"): firstByte]
        }
        manifestFirstByte = firstByte
        blobGetOK = RequestSeries(count: blobCount, duration: blobDuration)
        manifestGetOK = RequestSeries(count: manifestCount, duration: manifestDuration)
    }

    /// One counter per value of a single label, made up front so the hot
    /// path only looks one up.
    private static func counters(in registry: PrometheusCollectorRegistry, _ name: String, _ help: String,
                                 label: String, values: [String]) -> [String: Counter] {
        var counters: [String: Counter] = [:]
        for value in values {
            counters[value] = registry.makeCounter(descriptor: describe(name, help), labels: [(label, value)])
        }
        return counters
    }

    /// One finished client request. `kind` is `blob`, `passthrough`, `local`
    /// or `error`.
    public func requestFinished(kind: String, method: String, code: Int, seconds: Double) {
        requestFinished(requestSeries(kind: kind, method: method, code: code), seconds: seconds)
    }

    /// A finished request counted in series looked up before.
    public func requestFinished(_ series: RequestSeries, seconds: Double) {
        series.count.increment()
        series.duration.record(.nanoseconds(Int64(seconds * 1e9)))
    }

    /// The two series a finished request is counted in.
    public struct RequestSeries: Sendable {
        let count: Counter
        let duration: DurationHistogram
    }

    /// The series of a request of this kind, method and status; made on
    /// first use.
    public func requestSeries(kind: String, method: String, code: Int) -> RequestSeries {
        // The answers given most (a hit's `GET` 200) take no lock and hash
        // no string: two locked dictionary lookups per request, otherwise.
        if code == 200, method == "GET" {
            if kind == "blob" { return blobGetOK }
            if kind == "manifest" { return manifestGetOK }
        }
        let key = RequestKey(kind: kind, method: Self.boundedMethod(method), code: code)
        let counter = requestCounters.withLockedValue { counters in
            if let counter = counters[key] { return counter }
            let counter = registry.makeCounter(
                descriptor: Self.describe("cacheproxy_requests_total", "Client requests by kind, method and response status."),
                labels: [("kind", key.kind), ("method", key.method), ("code", String(code))])
            counters[key] = counter
            return counter
        }
        let duration = histogram("cacheproxy_request_duration_seconds",
                                 "Time from request head to the last response byte written.", kind: kind)
        return RequestSeries(count: counter, duration: duration)
    }

    /// Time from request head to response head, the figure a client's pull
    /// timeout is measured against.
    public func timeToFirstByte(kind: String, seconds: Double) {
        if kind == "manifest" { return manifestFirstByte.record(.nanoseconds(Int64(seconds * 1e9))) }
        histogram("cacheproxy_time_to_first_byte_seconds", Self.firstByteHelp, kind: kind)
            .record(.nanoseconds(Int64(seconds * 1e9)))
    }

    private func histogram(_ name: String, _ help: String, kind: String) -> DurationHistogram {
        let key = HistogramKey(name: name, kind: kind)
        return histograms.withLockedValue { cache in
            if let histogram = cache[key] { return histogram }
            let histogram = registry.makeDurationHistogram(
                descriptor: Self.describe(name, help), labels: [("kind", kind)], buckets: Self.durationBuckets)
            cache[key] = histogram
            return histogram
        }
    }

    /// One request sent to an upstream, by method (a `GET` of a manifest
    /// is what Docker Hub counts as a pull; a `HEAD` is free) and status
    /// (0: no response). `rateLimitRemaining` is the upstream's
    /// `ratelimit-remaining`, when it sent one.
    public func upstreamResponse(upstream: String, method: String, code: Int, rateLimitRemaining: Int? = nil) {
        let key = UpstreamKey(upstream: upstream, method: Self.boundedMethod(method), code: code)
        upstreamCounters.withLockedValue { counters in
            if let counter = counters[key] { return counter }
            let counter = registry.makeCounter(descriptor: Self.describe("cacheproxy_upstream_requests_total", "Requests sent to upstream registries, by upstream, method and response status (0: no response)."), labels: [("upstream", upstream), ("method", key.method), ("code", String(code))])
            counters[key] = counter
            return counter
        }.increment()
        if let rateLimitRemaining {
            rateLimitGauges.withLockedValue { gauges in
                if let gauge = gauges[upstream] { return gauge }
                let gauge = registry.makeGauge(descriptor: Self.describe("cacheproxy_upstream_ratelimit_remaining", "The upstream's ratelimit-remaining header at its last answer that had one (Docker Hub: pulls left in its window)."), labels: [("upstream", upstream)])
                gauges[upstream] = gauge
                return gauge
            }.set(to: Double(rateLimitRemaining))
        }
    }

    /// Fills of one upstream waiting for a download slot (`max_fills`).
    public func fillsWaiting(upstream: String) -> Gauge {
        registry.makeGauge(descriptor: Self.describe("cacheproxy_fills_waiting", "Upstream blob downloads waiting for a slot (upstreams[].max_fills), by upstream."), labels: [("upstream", upstream)])
    }

    public func setIOBackend(_ backend: String) {
        for name in ["io_uring", "threadpool"] {
            registry.makeGauge(descriptor: Self.describe("cacheproxy_io_backend", "The storage write backend in use (1) and the one not in use (0)."), labels: [("backend", name)])
                .set(to: name == backend ? 1.0 : 0.0)
        }
    }

    /// The registry's text plus the `process_*` family.
    public func exposition() -> String {
        registry.emitToString() + ProcessMetrics.exposition()
    }

    static func describe(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    static let durationBuckets: [Duration] = [
        .milliseconds(1), .milliseconds(5), .milliseconds(25), .milliseconds(100),
        .milliseconds(500), .seconds(1), .seconds(5), .seconds(30), .seconds(120),
    ]

    static func boundedMethod(_ method: String) -> String {
        switch method {
        case "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS": return method
        default: return "other"
        }
    }
}
