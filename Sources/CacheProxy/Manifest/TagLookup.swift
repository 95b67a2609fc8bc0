import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// A manifest pull by tag resolved on the event loop: the tag's upstream
/// `HEAD` goes out on a kept-alive connection of the client connection's own
/// loop (`LoopUpstreamPool`), and when the upstream names a manifest held in
/// memory (a 200 naming it, or a 304 to the manifest the `HEAD` expected),
/// the answer is written from there, all without a task hop.
///
/// The decisions are `TagResolver`'s, made in the same order; this only
/// takes the common case off the async side. Every other answer (a refusal,
/// a 5xx, no answer, a manifest not in memory) is handed to `TagResolver`
/// with what the upstream said (`TagResolver.Asked`), so the upstream is
/// asked once per request either way.
///
/// A class, not a struct: a lookup is handed from the front handler to the
/// pool's exchange and its answer's closures, and each copy of a struct
/// retained its dozen strings (the upstream's settings among them), ~40
/// retains a pull (`benchmarks/callgrind.sh`).
final class TagLookup {
    let name: String
    let tag: String
    let upstream: ProxyConfig.Upstream
    /// The `HEAD` for the upstream, as the bytes that go out: the client's
    /// `Accept`, credentials and user agent, as `TagResolver` would send them.
    let ask: ByteBuffer
    /// The client's `Authorization`, what the access memory keys the
    /// upstream's yes by (`AccessGate.grant`).
    let credentials: HTTPHeaders
    /// The manifest the tag named last for a client taking these types
    /// (`TagTable.expected`), named in the `HEAD`'s `If-None-Match`: a
    /// registry that still finds the tag there answers 304 as soon as it
    /// has read the tag, without reading and parsing the manifest it
    /// would describe (distribution spends ~17% less CPU on such a pull).
    /// Only for a `GET`: a `HEAD`'s answer is the upstream's own headers,
    /// which a 304 leaves out.
    let expected: TagTable.Entry?

    /// The tag's place in the tag table, made once: the expectation reads
    /// it, and the answer records under it.
    let key: TagTable.Key

    /// The lookup for `head`, when the event loop can make it: a `GET`
    /// (whole) or `HEAD` of a manifest by tag, for an upstream that
    /// revalidates manifests and that the loop's pool can reach (plaintext
    /// or TLS, no account of the proxy's own).
    init?(_ head: HTTPRequestHead, router: Router, tags: TagTable?) {
        guard head.method == .GET || head.method == .HEAD,
              // A body (odd on a GET, but a client may send one) is the
              // async side's to read and drop.
              !RequestHandler.hasBody(head),
              !head.headers.contains(name: "range"),
              let (name, tag, upstream) = Self.route(method: head.method, uri: head.uri,
                                                     host: head.headers.first(name: "host"), router: router)
        else { return nil }
        var headers = BlobResponder.upstreamHeaders(head.headers, kind: .manifest)
        headers.replaceOrAdd(name: "host", value: upstream.authority)
        key = TagTable.Key(upstream: upstream.host, repository: name, tag: tag)
        expected = tags?.expect(key, method: head.method, headers: &headers)
        var ask = ByteBuffer()
        guard UpstreamAnswerHead.writeRequest(uri: "/v2/\(name)/manifests/\(tag)", headers: headers, into: &ask)
        else { return nil }
        (self.name, self.tag, self.upstream, self.ask) = (name, tag, upstream, ask)
        self.credentials = HTTPHeaders(headers["authorization"].map { ("authorization", $0) })
    }

    /// The lookup for a `GET` the fast path read from the connection's bytes
    /// (`HitFrontHandler`), under the same conditions; `bytes` is the head
    /// the request's offsets point into. Several `Accept` fields go the
    /// decoder's way, which keeps them all.
    ///
    /// The `HEAD` is written from those bytes: no `HTTPHeaders`, no
    /// `HTTPRequestHead`, no `String` per field. `PlainGetHead` let only
    /// visible ASCII, space and tab into the values, so they are copied as
    /// they came (as the decoder's way passes them).
    init?(_ request: PlainGetHead, bytes: ByteBuffer, router: Router, tags: TagTable?) {
        guard request.acceptCount <= 1,
              let (name, tag, upstream) = Self.route(method: .GET, uri: request.target, host: request.host,
                                                     router: router)
        else { return nil }
        var authority = upstream.authority  // made on each call
        // Over the contiguous bytes: `allSatisfy` on the `UTF8View` took
        // ~800 instructions a pull.
        guard authority.withUTF8({ $0.allSatisfy(UpstreamAnswerHead.isFieldByte) }) else { return nil }
        let key = TagTable.Key(upstream: upstream.host, repository: name, tag: tag)
        let expected = tags?.expected(key) { type in
            bytes.withUnsafeReadableBytes { raw in
                if let accept = request.accept { return type.isNamed(byField: UnsafeRawBufferPointer(rebasing: raw[accept])) }
                var all = MediaType.manifestAccept
                return all.withUTF8 { type.isNamed(byField: UnsafeRawBufferPointer($0)) }
            }
        }
        var ask = ByteBuffer()
        ask.reserveCapacity(96 + name.utf8.count + tag.utf8.count + authority.utf8.count
            + (request.authorization?.utf8.count ?? 0) + (request.userAgent?.count ?? 0)
            + (request.accept?.count ?? MediaType.manifestAccept.utf8.count))
        ask.writeStaticString("HEAD /v2/")
        ask.writeString(name)
        ask.writeStaticString("/manifests/")
        ask.writeString(tag)
        ask.writeStaticString(" HTTP/1.1\r\nhost: ")
        ask.writeString(authority)
        if let authorization = request.authorization {
            ask.writeStaticString("\r\nauthorization: ")
            ask.writeString(authorization)
        }
        bytes.withUnsafeReadableBytes { raw in
            if let userAgent = request.userAgent {
                ask.writeStaticString("\r\nuser-agent: ")
                ask.writeBytes(UnsafeRawBufferPointer(rebasing: raw[userAgent]))
            }
            ask.writeStaticString("\r\naccept: ")
            if let accept = request.accept {
                ask.writeBytes(UnsafeRawBufferPointer(rebasing: raw[accept]))
            } else {
                ask.writeString(MediaType.manifestAccept)
            }
        }
        if let expected {
            // `entityTag`'s bytes, without making the string per pull.
            ask.writeStaticString("\r\nif-none-match: \"")
            ask.writeString(expected.digest.algorithm.rawValue)
            ask.writeStaticString(":")
            ask.writeString(expected.digest.hex)
            ask.writeStaticString("\"")
        }
        ask.writeStaticString("\r\n\r\n")
        self.expected = expected
        self.key = key
        self.name = name
        self.tag = tag
        self.upstream = upstream
        self.ask = ask
        self.credentials = request.authorization.map { HTTPHeaders([("authorization", $0)]) } ?? HTTPHeaders()
    }

    /// The manifest the upstream's answer names: a 200's
    /// `Docker-Content-Digest` and `Content-Type`, or, for a 304 to the
    /// `If-None-Match` this lookup sent, the manifest it expected. Nil for
    /// anything else, and for a 304 that names another digest (it
    /// contradicts itself, and is not believed).
    func named(by reply: UpstreamAnswerHead) -> (digest: Digest, mediaType: MediaType?)? {
        switch reply.status {
        case .ok:
            guard let digest = reply.digestField
                .flatMap({ try? Digest(parsing: Substring($0)) })
            else { return nil }
            return (digest, reply.contentType.flatMap(MediaType.init))
        case .notModified:
            guard let expected,
                  expected.isConfirmed(by: reply.status, digestField: reply.digestField)
            else { return nil }
            return (expected.digest, expected.mediaType)
        default:
            return nil
        }
    }

    /// The answer as the async side takes it (`TagResolver`, which asks
    /// with a plain `HEAD` and knows 200s only): a 304 to this lookup's
    /// `If-None-Match` becomes the 200 it stands for, naming the expected
    /// manifest and its type.
    func handOff(_ reply: UpstreamAnswerHead) -> TagResolver.Asked {
        guard reply.status == .notModified, let expected, named(by: reply) != nil else {
            return .answered(reply.status, reply.headers)
        }
        return .answered(.ok, expected.namedHeaders)
    }

    /// The repository, tag and upstream of a pull by tag the loop can ask
    /// for itself.
    private static func route(method: HTTPMethod, uri: String, host: String?, router: Router)
        -> (name: String, tag: String, upstream: ProxyConfig.Upstream)? {
        guard case .manifest(let name, .tag(let tag))? = try? RequestTarget.classify(method: method.rawValue, uri: uri),
              let upstream = router.route(host: host, namespace: RequestURI.queryValue("ns", in: uri)),
              upstream.manifests == .revalidate, LoopUpstreamPool.serves(upstream)
        else { return nil }
        return (name, tag, upstream)
    }
}

extension CacheHitResponder {
    /// Asks the upstream for the tag and, when `answer` can write the
    /// answer from what the upstream said (`named`), lets it. `then` runs on
    /// the loop afterwards: with nil when the answer was written (or the
    /// client left), else with what the async side needs to answer. Not
    /// called when this returns false.
    /// False, having done nothing, when this loop has no pool.
    func resolve(_ lookup: TagLookup, context: ChannelHandlerContext,
                 answer: @escaping (_ reply: UpstreamAnswerHead, _ started: ContinuousClock.Instant) -> Bool,
                 then: @escaping (TagHandOff.Handed?) -> Void) -> Bool {
        let channel = context.channel
        let started = ContinuousClock.now
        let answerWithin = TimeAmount.fromSeconds(live.read { $0.timeouts.upstreamSeconds })
        // Busy while the upstream is asked, as any request in progress;
        // marked first, as a failure may be handed on within `ask`.
        tracker.setIdle(channel, false)
        // Only what it uses, not this whole responder, goes into the closure.
        let (metrics, tracker) = (metrics, tracker)
        let asked = upstreams.ask(lookup.ask, to: lookup.upstream, on: context.eventLoop, within: answerWithin) {
            result in
            let handOff: TagResolver.Asked
            switch result {
            case .success(let reply):
                metrics.upstreamAnswered(lookup.upstream, method: .HEAD, status: reply.status,
                                         rateLimit: reply.rateLimitRemaining)
                guard channel.isActive else {
                    tracker.setIdle(channel, true)
                    then(nil)
                    return
                }
                if answer(reply, started) {
                    metrics.tagPullsOnLoop.increment()
                    then(nil)
                    return
                }
                handOff = lookup.handOff(reply)
            case .failure(let error):
                metrics.upstreamAnswered(lookup.upstream, method: .HEAD, status: nil, rateLimit: nil)
                handOff = .failed(error)
            }
            // Still busy: the async side takes the request over without
            // marking it again, so a drain in between cannot close it as idle.
            then(TagHandOff.Handed(asked: handOff, upstream: lookup.upstream, started: started))
        }
        if !asked { tracker.setIdle(channel, true) }
        return asked
    }

    /// The upstream's 200 naming a manifest (or 304 to the one expected),
    /// answered here: a `HEAD` with
    /// the upstream's own headers (as `TagResolver` does), a `GET` from
    /// memory, through NIO's encoder (`RequestFrontHandler`). False, having
    /// written nothing, for anything else.
    func answer(_ lookup: TagLookup, head: HTTPRequestHead, reply: UpstreamAnswerHead,
                context: ChannelHandlerContext, client: String?, started: ContinuousClock.Instant,
                credentials: AccessGate.CredentialMemo, wrap: (HTTPServerResponsePart) -> NIOAny) -> Bool {
        guard context.channel.isWritable,
              let (digest, entry) = named(lookup, get: head.method == .GET, reply: reply,
                                          clientHeaders: head.headers, credentials: credentials, started: started)
        else { return false }
        let keepAlive = head.isKeepAlive && !tracker.isDraining
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

    /// The same answer to a `GET` the fast path took from the bytes
    /// (`HitFrontHandler`): the manifest's prebuilt head and body, written
    /// from the front of the pipeline as a pull by digest's are. False,
    /// having written nothing, for anything else, and while draining (the
    /// answer must then say `Connection: close`: the decoder's way does).
    func answerAhead(_ lookup: TagLookup, request: PlainGetHead, reply: UpstreamAnswerHead,
                     context: ChannelHandlerContext, client: String?, started: ContinuousClock.Instant,
                     credentials: AccessGate.CredentialMemo, timeouts: ConnectionTimeoutsHandler) -> Bool {
        guard context.channel.isWritable, !tracker.isDraining,
              let (_, entry) = named(lookup, get: true, reply: reply, clientHeaders: lookup.credentials,
                                     credentials: credentials, started: started),
              let entry
        else { return false }
        writeAhead(entry, kind: .manifest, request: request, upstream: lookup.upstream, client: client,
                   started: started, context: context, timeouts: timeouts)
        return true
    }

    /// What the loop answers from the upstream's reply: its 200 (or 304,
    /// `named(by:)`) naming a
    /// manifest, held in memory for a `GET` (and marked used). That is then
    /// remembered as the tag's and as the upstream's yes to this client,
    /// and the wait is counted, as the async side records it for every tag
    /// pull: the answer's head goes out next. Nil, having done nothing,
    /// for anything else.
    private func named(_ lookup: TagLookup, get: Bool, reply: UpstreamAnswerHead, clientHeaders: HTTPHeaders,
                       credentials: AccessGate.CredentialMemo, started: ContinuousClock.Instant)
        -> (digest: Digest, entry: SmallBlobCache.Entry?)? {
        guard let (digest, mediaType) = lookup.named(by: reply) else { return nil }
        let entry = get ? smallBlobs.get(digest, kind: .manifest) : nil
        guard !get || (entry != nil && store.use(digest) != nil) else { return nil }
        TagResolver.remember(digest, mediaType: mediaType,
                             key: lookup.key, upstream: lookup.upstream, clientHeaders: clientHeaders,
                             repository: lookup.name, tags: tags, gate: gate, memo: credentials,
                             superseding: lookup.expected)
        metrics.timeToFirstByte(kind: "manifest", seconds: started.duration(to: .now).inSeconds)
        return (digest, entry)
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

/// A pull by tag `HitFrontHandler` asked the upstream for and could not
/// answer itself: the upstream's answer waits here while the request's bytes
/// go through the decoder, and `RequestFrontHandler` takes it with the next
/// head, which is that request's, and hands both to the async side instead
/// of asking again. One per connection, on its event loop only.
final class TagAskedAhead {
    private var handed: TagHandOff.Handed?

    func put(_ value: TagHandOff.Handed) { handed = value }

    func take() -> TagHandOff.Handed? {
        defer { handed = nil }
        return handed
    }
}
