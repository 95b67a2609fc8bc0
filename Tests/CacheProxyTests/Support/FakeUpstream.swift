import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// An in-process upstream for what a real registry will not do: wrong bytes,
/// cut connections, redirects, slow streams, silence.
final class FakeUpstream: Sendable {
    struct Reply: Sendable {
        var status: HTTPResponseStatus = .ok
        var headers: HTTPHeaders = [:]
        var body: [UInt8] = []
        /// Body sent in pieces of this size with `delay` between them.
        var chunkSize = 64 * 1024
        var delay: TimeAmount = .zero
        /// Close the connection after this many body bytes.
        var cutAfter: Int?
        /// Never answer at all.
        var silent = false
        /// Wait this long before the response head.
        var headDelay: TimeAmount = .zero
        /// No Content-Length: the body goes out chunked.
        var chunked = false
        /// After this many body bytes, pause for `stallFor` before the rest.
        var stallAfter: Int?
        var stallFor: TimeAmount = .zero
        /// Close the connection after the whole answer, without saying so
        /// (as a keep-alive timeout does between requests).
        var closeAfter = false
        /// On a connection that answered before, close instead of
        /// answering: a keep-alive timeout that met the next request.
        var dropIfReused = false
    }

    struct Seen: Sendable {
        let method: HTTPMethod
        let uri: String
        let headers: HTTPHeaders
        /// Request body bytes received before the request's end.
        var bodyBytes = 0
    }

    private let seen = NIOLockedValueBox<[Seen]>([])
    private let accepted = NIOLockedValueBox(0)
    /// Connections accepted so far.
    var connections: Int { accepted.withLockedValue { $0 } }
    private let listener: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>
    private let task: Task<Void, Never>
    let port: Int

    var requests: [Seen] { seen.withLockedValue { $0 } }
    /// The GETs alone: what fetched a blob (access checks are HEADs).
    var gets: [Seen] { requests.filter { $0.method == .GET } }

    init(host: String = "127.0.0.1", _ reply: @escaping @Sendable (HTTPRequestHead) -> Reply) async throws {
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .bind(host: host, port: 0) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    return try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(
                        wrappingChannelSynchronously: channel)
                }
            }
        self.listener = listener
        self.port = listener.channel.localAddress?.port ?? 0
        let seen = self.seen
        let accepted = self.accepted
        self.task = Task {
            try? await withThrowingDiscardingTaskGroup { group in
                try await listener.executeThenClose { connections in
                    for try await connection in connections {
                        accepted.withLockedValue { $0 += 1 }
                        group.addTask {
                            try? await Self.serve(connection, seen: seen, reply: reply)
                        }
                    }
                }
            }
        }
    }

    private static func serve(
        _ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>,
        seen: NIOLockedValueBox<[Seen]>, reply: @Sendable (HTTPRequestHead) -> Reply
    ) async throws {
        try await connection.executeThenClose { inbound, outbound in
            var head: HTTPRequestHead?
            var bodyBytes = 0
            var answered = 0
            for try await part in inbound {
                switch part {
                case .head(let h):
                    head = h
                    bodyBytes = 0
                case .body(let buffer): bodyBytes += buffer.readableBytes
                case .end:
                    guard let h = head else { continue }
                    seen.withLockedValue {
                        $0.append(Seen(method: h.method, uri: h.uri, headers: h.headers, bodyBytes: bodyBytes))
                    }
                    let r = reply(h)
                    if r.dropIfReused, answered > 0 { return }
                    answered += 1
                    if r.silent {
                        try await Task.sleep(for: .seconds(60))
                        return
                    }
                    if r.headDelay > .zero { try await Task.sleep(for: .nanoseconds(r.headDelay.nanoseconds)) }
                    var headers = r.headers
                    if r.chunked {
                        headers.add(name: "transfer-encoding", value: "chunked")
                    } else if !headers.contains(name: "content-length") {
                        headers.add(name: "content-length", value: String(r.body.count))
                    }
                    try await outbound.write(.head(HTTPResponseHead(version: h.version, status: r.status, headers: headers)))
                    if h.method != .HEAD {
                        var offset = 0
                        let end = min(r.body.count, r.cutAfter ?? Int.max)
                        var stalled = false
                        while offset < end {
                            if let stallAfter = r.stallAfter, offset >= stallAfter, !stalled {
                                stalled = true
                                try await Task.sleep(for: .nanoseconds(r.stallFor.nanoseconds))
                            }
                            var next = min(end, offset + r.chunkSize)
                            if let stallAfter = r.stallAfter, !stalled, offset < stallAfter { next = min(next, stallAfter) }
                            try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: r.body[offset..<next]))))
                            offset = next
                            if r.delay > .zero { try await Task.sleep(for: .nanoseconds(r.delay.nanoseconds)) }
                        }
                        if r.cutAfter != nil { return }
                    }
                    try await outbound.write(.end(nil))
                    if r.closeAfter { return }
                }
            }
        }
    }

    func stop() async {
        try? await listener.channel.close()
        task.cancel()
        _ = await task.value
    }
}

extension FakeUpstream {
    /// A registry that wants a bearer token and is its own token service at
    /// `/token`: `token` answers token requests, `accepts` judges a request's
    /// `Authorization`, `resource` answers the requests it accepts. Others
    /// get a 401 whose challenge names this server's `/token` as the realm,
    /// followed by `challenge` (`,service="x",scope="y"`).
    static func bearer(challenge: String = "", token: @escaping @Sendable (HTTPRequestHead) -> Reply,
                       accepts: @escaping @Sendable (String?) -> Bool,
                       resource: @escaping @Sendable (HTTPRequestHead) -> Reply = { _ in .init(body: Array("{}".utf8)) })
        async throws -> FakeUpstream {
        let port = NIOLockedValueBox(0)
        let fake = try await FakeUpstream { head in
            if head.uri.hasPrefix("/token") { return token(head) }
            guard accepts(head.headers.first(name: "authorization")) else {
                let realm = "http://127.0.0.1:\(port.withLockedValue { $0 })/token"
                return .init(status: .unauthorized, headers: ["www-authenticate": #"Bearer realm="\#(realm)""# + challenge],
                             body: Array(#"{"errors":[]}"#.utf8))
            }
            return resource(head)
        }
        port.withLockedValue { $0 = fake.port }
        return fake
    }
}
