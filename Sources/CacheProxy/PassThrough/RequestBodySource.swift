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

    /// The stream as AsyncHTTPClient reads it, telling `progress` when it
    /// takes a chunk, comes back for the next, and reaches the end.
    func reporting(to progress: UploadProgress) -> Reporting {
        Reporting(base: stream, progress: progress)
    }

    struct Reporting: AsyncSequence, Sendable {
        typealias Element = ByteBuffer
        let base: AsyncThrowingChannel<ByteBuffer, any Error>
        let progress: UploadProgress

        struct AsyncIterator: AsyncIteratorProtocol {
            var base: AsyncThrowingChannel<ByteBuffer, any Error>.AsyncIterator
            let progress: UploadProgress

            mutating func next() async throws -> ByteBuffer? {
                progress.pulled()
                let next = try await base.next()
                if next == nil { progress.ended() } else { progress.handed() }
                return next
            }
        }

        func makeAsyncIterator() -> AsyncIterator {
            AsyncIterator(base: base.makeAsyncIterator(), progress: progress)
        }
    }
}
