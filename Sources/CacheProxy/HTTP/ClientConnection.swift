import AsyncAlgorithms
import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import NIOPosix

/// A connection as accepted: its channel, and what its event loop hands
/// to its task besides the request parts.
struct AcceptedConnection: Sendable {
    let channel: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>
    let handOff: TagHandOff
}

/// Serves the requests of one client connection, one after the other.
struct ClientConnection {
    let channel: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>
    /// The upstream's answer to a tag the event loop asked about already.
    let handOff: TagHandOff
    let handler: RequestHandler
    let tracker: ConnectionTracker
    /// Reads file regions not in the page cache (every region on TLS).
    let fileIO: NonBlockingFileIO?
    /// A TLS connection: file bytes are read and encrypted, not sent with
    /// sendfile.
    let tls: Bool

    func serve() async {
        let raw = channel.channel
        let remoteAddress = raw.remoteAddress?.ipAddress
        let closeWatch = CloseWatch(raw)
        do {
            try await channel.executeThenClose { inbound, _ in
                var parts = inbound.makeAsyncIterator()
                while let part = try await parts.next() {
                    // Body parts or ends of a request already answered are
                    // skipped until the next head.
                    guard case .head(let head) = part else { continue }
                    // Taken with every head, so it belongs to this request or is nil.
                    let handed = handOff.take()
                    // A request the event loop hands on is busy already
                    // (`TagLookup`), and stays so across the hop.
                    if handed == nil { tracker.setIdle(raw, false) }
                    let keepAlive = head.isKeepAlive && !tracker.isDraining
                    let response = ResponseChannel(channel: raw, keepAlive: keepAlive, version: head.version,
                                                   closeWatch: closeWatch, fileIO: fileIO, tls: tls,
                                                   coldReads: handler.metrics.coldReadBytes)
                    let origin = PassThrough.Origin(head: head, clientAddress: remoteAddress,
                                                    listenerScheme: tls ? "https" : "http",
                                                    trustForwarded: handler.trustForwardedHeaders)
                    try await serveRequest(head, parts: &parts, origin: origin, handed: handed, response: response)
                    guard keepAlive, tracker.setIdle(raw, true), raw.isActive else { break }
                }
            }
        } catch {
            // A client that went away: nothing to answer.
        }
    }

    private func serveRequest(
        _ head: HTTPRequestHead, parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        origin: PassThrough.Origin, handed: TagHandOff.Handed?, response: ResponseChannel
    ) async throws {
        guard RequestHandler.hasBody(head) else {
            // Nothing but the end of the request is left to read.
            while let part = try await parts.next() {
                if case .end = part { break }
            }
            await handler.handle(head, body: nil, origin: origin, handed: handed, response: response)
            return
        }
        let length: HTTPClientRequest.Body.Length =
            head.headers.first(name: "content-length").flatMap { Int64($0) }.map { .known($0) } ?? .unknown
        let pipe = AsyncThrowingChannel<ByteBuffer, any Error>()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                await handler.handle(head, body: RequestBodySource(stream: pipe, length: length),
                                     origin: origin, response: response)
                // If the upstream answered before taking the whole body, the
                // rest is still read (and dropped) below. Failing (not
                // finishing) the pipe here means a body that did not reach
                // its end can never be completed for the upstream; after a
                // clean end it does nothing.
                pipe.fail(RequestBodySource.Interrupted())
            }
            // Only the request's end finishes the body cleanly. Any other way
            // out (the client left, the body timeout closed the connection,
            // an error) fails it, so the upstream request is aborted instead
            // of being sent as complete.
            var ended = false
            defer { if !ended { pipe.fail(RequestBodySource.Interrupted()) } }
            while let part = try await parts.next() {
                if case .body(let buffer) = part { await pipe.send(buffer) }
                if case .end = part {
                    ended = true
                    break
                }
            }
            if ended { pipe.finish() } else { pipe.fail(RequestBodySource.Interrupted()) }
            try await group.waitForAll()
        }
    }
}
