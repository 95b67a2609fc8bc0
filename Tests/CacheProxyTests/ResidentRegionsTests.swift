import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import XCTest
@testable import CacheProxy
#if canImport(Glibc)
import Glibc
#endif

/// A warm file sent from the event loop region by region
/// (`ResponseChannel.sendResident`): the connection's writability does not
/// flip per region, and the usual write-buffer marks, which bound what a
/// slow client can make the proxy hold from memory, are back once the file
/// is out.
final class ResidentRegionsTests: XCTestCase {
    typealias F = FaultInjectionTests

    /// Counts the writability changes the pipeline sees.
    private final class WritabilityCounter: ChannelInboundHandler, Sendable {
        typealias InboundIn = NIOAny
        let changes = NIOLockedValueBox(0)
        func channelWritabilityChanged(context: ChannelHandlerContext) {
            changes.withLockedValue { $0 += 1 }
            context.fireChannelWritabilityChanged()
        }
    }

    func testAWarmFileGoesOutWithoutFlippingWritabilityAndTheUsualMarksComeBack() async throws {
        let size = 16 << 20  // four regions
        let bytes = F.randomBytes(size)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("resident-\(UUID()).bin").path
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        defer { try? FileManager.default.removeItem(atPath: path) }

        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let counter = WritabilityCounter()
        // What the server side saw: the marks before and after the file.
        let marks = NIOLockedValueBox<(before: ChannelOptions.Types.WriteBufferWaterMark?,
                                       after: ChannelOptions.Types.WriteBufferWaterMark?)>((nil, nil))
        let sent = NIOLockedValueBox<(any Error)?>(nil)
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(HTTPResponseEncoder())
                    try channel.pipeline.syncOperations.addHandler(counter)
                }.map {
                    Task {
                        do {
                            let before = try await channel.getOption(ChannelOptions.writeBufferWaterMark).get()
                            // No thread pool: no page-cache check, so this VM's
                            // reclaim of a page cannot send a region the cold way.
                            let response = ResponseChannel(channel: channel, keepAlive: true, version: .http1_1,
                                                           closeWatch: CloseWatch(channel))
                            let fd = open(path, O_RDONLY)
                            guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "open") }
                            let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
                            defer { try? handle.close() }
                            response.head(.ok, ["content-length": String(size)])
                            try await response.file(handle, range: 0..<Int64(size))
                            try await response.end()
                            let after = try await channel.getOption(ChannelOptions.writeBufferWaterMark).get()
                            marks.withLockedValue { $0 = (before, after) }
                        } catch {
                            sent.withLockedValue { $0 = error }
                        }
                        channel.close(promise: nil)
                    }
                    return ()
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let port = try XCTUnwrap(server.localAddress?.port)
        let client = try RawSocket(port: port)
        // A small receive buffer: the regions go out in many sends.
        var buffer: Int32 = 256 << 10
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &buffer, socklen_t(MemoryLayout<Int32>.size))
        XCTAssertTrue(client.receiveHead().hasPrefix("HTTP/1.1 200"))
        let body = client.receive(limit: size + 1)
        client.close()
        XCTAssertEqual(body.count, size)
        XCTAssertTrue(body == bytes, "every byte right")
        XCTAssertNil(sent.withLockedValue { $0 })
        let (before, after) = marks.withLockedValue { $0 }
        XCTAssertNotNil(before)
        XCTAssertEqual(after?.low, before?.low, "the usual low mark is back")
        XCTAssertEqual(after?.high, before?.high, "the usual high mark is back")
        // Before: two flips per 4 MiB region (above the high mark when
        // queued, below the low one when written), eight here.
        XCTAssertEqual(counter.changes.withLockedValue { $0 }, 0, "no flip per region")
        try await server.close()
        try await group.shutdownGracefully()
    }
}
