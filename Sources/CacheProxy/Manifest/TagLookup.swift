import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// A manifest pull by tag resolved on the event loop: the tag's upstream
/// `HEAD` goes out on a kept-alive connection of the client connection's own
/// loop (`LoopUpstreamPool`), and when the upstream names a manifest held in
/// memory, the answer is written from there, all without a task hop.
///
/// The decisions are `TagResolver`'s, made in the same order; this only
/// takes the common case off the async side. Every other answer (a refusal,
/// a 5xx, no answer, a manifest not in memory) is handed to `TagResolver`
/// with what the upstream said (`TagResolver.Asked`), so the upstream is
/// asked once per request either way.
struct TagLookup {
    let name: String
    let tag: String
    let upstream: ProxyConfig.Upstream
    /// The `HEAD` for the upstream: the client's `Accept`, credentials and
    /// user agent, as `TagResolver` would send them.
    let ask: HTTPRequestHead

    var key: TagTable.Key { TagTable.Key(upstream: upstream.host, repository: name, tag: tag) }

    /// The lookup for `head`, when the event loop can make it: a `GET`
    /// (whole) or `HEAD` of a manifest by tag, for an upstream that
    /// revalidates manifests and that the loop's pool can reach (plaintext
    /// or TLS, no account of the proxy's own).
    init?(_ head: HTTPRequestHead, router: Router) {
        guard head.method == .GET || head.method == .HEAD,
              // A body (odd on a GET, but a client may send one) is the
              // async side's to read and drop.
              !RequestHandler.hasBody(head),
              case .manifest(let name, .tag(let tag))? = try? RequestTarget.classify(method: head.method.rawValue,
                                                                                    uri: head.uri),
              !head.headers.contains(name: "range"),
              let upstream = router.route(host: head.headers.first(name: "host"),
                                          namespace: RequestURI.queryValue("ns", in: head.uri)),
              upstream.manifests == .revalidate, LoopUpstreamPool.serves(upstream)
        else { return nil }
        var headers = BlobResponder.upstreamHeaders(head.headers, kind: .manifest)
        headers.replaceOrAdd(name: "host", value: upstream.authority)
        self.name = name
        self.tag = tag
        self.upstream = upstream
        self.ask = HTTPRequestHead(version: .http1_1, method: .HEAD, uri: "/v2/\(name)/manifests/\(tag)",
                                   headers: headers)
    }
}

extension CacheHitResponder {
    /// Asks the upstream for the tag and, when it names a manifest held in
    /// memory (or the client asked for a `HEAD`), writes the answer. `then`
    /// runs on the loop afterwards: with nil when the answer was written
    /// (or the client left), else with what the async side needs to answer.
    /// Not called when this returns false.
    /// False, having done nothing, when this loop has no pool.
    func resolve(_ lookup: TagLookup, head: HTTPRequestHead, context: ChannelHandlerContext, client: String?,
                 credentials: AccessGate.CredentialMemo, wrap: @escaping (HTTPServerResponsePart) -> NIOAny,
                 then: @escaping (TagHandOff.Handed?) -> Void) -> Bool {
        let channel = context.channel
        let started = ContinuousClock.now
        let answerWithin = TimeAmount.fromSeconds(live.config.timeouts.upstreamSeconds)
        guard let asked = upstreams.ask(lookup.ask, to: lookup.upstream, on: context.eventLoop, within: answerWithin)
        else { return false }
        // Busy while the upstream is asked, as any request in progress.
        tracker.setIdle(channel, false)
        asked.assumeIsolated().whenComplete { result in
            let handOff: TagResolver.Asked
            switch result {
            case .success(let reply):
                metrics.upstreamAnswered(lookup.upstream, method: .HEAD, status: reply.status, headers: reply.headers)
                guard channel.isActive else {
                    tracker.setIdle(channel, true)
                    then(nil)
                    return
                }
                if answer(lookup, head: head, reply: reply, context: context, client: client, started: started,
                          credentials: credentials, wrap: wrap) {
                    then(nil)
                    return
                }
                handOff = .answered(reply.status, reply.headers)
            case .failure(let error):
                metrics.upstreamAnswered(lookup.upstream, method: .HEAD, status: nil, headers: nil)
                handOff = .failed(error)
            }
            // Still busy: the async side takes the request over without
            // marking it again, so a drain in between cannot close it as idle.
            then(TagHandOff.Handed(asked: handOff, upstream: lookup.upstream, started: started))
        }
        return true
    }

    /// The upstream's 200 naming a manifest, answered here: a `HEAD` with
    /// the upstream's own headers (as `TagResolver` does), a `GET` from
    /// memory. False, having written nothing, for anything else.
    private func answer(_ lookup: TagLookup, head: HTTPRequestHead, reply: HTTPResponseHead,
                        context: ChannelHandlerContext, client: String?, started: ContinuousClock.Instant,
                        credentials: AccessGate.CredentialMemo, wrap: (HTTPServerResponsePart) -> NIOAny) -> Bool {
        guard reply.status == .ok, context.channel.isWritable,
              let digest = reply.headers.first(name: "docker-content-digest")
                .flatMap({ try? Digest(parsing: Substring($0)) })
        else { return false }
        let entry = head.method == .GET ? smallBlobs.get(digest, kind: .manifest) : nil
        guard head.method == .HEAD || (entry != nil && store.use(digest) != nil) else { return false }
        _ = TagResolver.remember(upstreamHeaders: reply.headers, key: lookup.key, upstream: lookup.upstream,
                                 clientHeaders: head.headers, repository: lookup.name, tags: tags, gate: gate,
                                 memo: credentials)
        let keepAlive = head.isKeepAlive && !tracker.isDraining
        // The head goes out now, after the upstream's answer: the wait a
        // client's pull timeout is measured against, as the async side
        // records it for every tag pull.
        metrics.timeToFirstByte(kind: "manifest", seconds: started.duration(to: .now).inSeconds)
        if let entry {
            send(head, digest: digest, kind: .manifest, entry: entry, size: Int64(entry.bytes.readableBytes),
                 upstream: lookup.upstream, keepAlive: keepAlive, context: context, client: client, started: started,
                 wrap: wrap)
            return true
        }
        // A HEAD: the upstream's own answer, its type, length and digest.
        var headers = PassThrough.endToEnd(reply.headers)
        if !keepAlive { headers.replaceOrAdd(name: "connection", value: "close") }
        context.write(wrap(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))), promise: nil)
        let written = context.writeAndFlush(wrap(.end(nil)))
        let hit = Hit(kind: .manifest, method: "HEAD", uri: head.uri, host: head.headers.first(name: "host"),
                      upstream: lookup.upstream.host, client: client, status: 200, sent: 0, started: started,
                      keepAlive: keepAlive, answer: .passthrough)
        let channel = context.channel
        written.assumeIsolated().whenComplete { finished(hit, result: $0, channel: channel) }
        return true
    }
}

/// What `TagLookup` got from the upstream for a request it hands on to the
/// async side: put on the event loop just before the request's head goes
/// on, taken by `ClientConnection` with each head it reads (nil for every
/// other request), so an answer never outlives its request. One per
/// connection.
final class TagHandOff: Sendable {
    struct Handed: Sendable {
        let asked: TagResolver.Asked
        /// The upstream it was asked of: a reload in between may route the
        /// request elsewhere, and then the answer is not used.
        let upstream: ProxyConfig.Upstream
        /// When the request came: its time counts from there.
        let started: ContinuousClock.Instant

        /// The answer, when the request is still routed to the upstream
        /// that gave it.
        func asked(of upstream: ProxyConfig.Upstream) -> TagResolver.Asked? {
            upstream == self.upstream ? asked : nil
        }
    }

    private let asked = NIOLockedValueBox<Handed?>(nil)

    func put(_ value: Handed) { asked.withLockedValue { $0 = value } }

    func take() -> Handed? {
        asked.withLockedValue { value in
            defer { value = nil }
            return value
        }
    }
}
