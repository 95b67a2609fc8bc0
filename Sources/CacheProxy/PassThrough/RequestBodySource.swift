import AsyncAlgorithms
import AsyncHTTPClient
import NIOCore

/// A client's request body on its way upstream while it arrives.
///
/// The channel can carry an error, and must: a client that goes away, or
/// whose body stops for `timeouts.request_body`, ends the stream with
/// `Interrupted`, which aborts the upstream request. Ending it cleanly
/// instead would send a chunked upload's last chunk, and the upstream would
/// take a cut upload for a complete one.
struct RequestBodySource: Sendable {
    let stream: AsyncThrowingChannel<ByteBuffer, any Error>
    let length: HTTPClientRequest.Body.Length

    struct Interrupted: Error {}

    /// The stream as AsyncHTTPClient reads it, firing `sent` once it has
    /// been read to its end.
    func signalling(_ sent: BodySent) -> Signalling {
        Signalling(base: stream, sent: sent)
    }

    struct Signalling: AsyncSequence, Sendable {
        typealias Element = ByteBuffer
        let base: AsyncThrowingChannel<ByteBuffer, any Error>
        let sent: BodySent

        struct AsyncIterator: AsyncIteratorProtocol {
            var base: AsyncThrowingChannel<ByteBuffer, any Error>.AsyncIterator
            let sent: BodySent

            mutating func next() async throws -> ByteBuffer? {
                let next = try await base.next()
                if next == nil { sent.signal() }
                return next
            }
        }

        func makeAsyncIterator() -> AsyncIterator {
            AsyncIterator(base: base.makeAsyncIterator(), sent: sent)
        }
    }
}
