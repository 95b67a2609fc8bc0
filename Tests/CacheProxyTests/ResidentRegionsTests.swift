import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import XCTest
@testable import CacheProxy
import IOURing
#if canImport(Glibc)
import Glibc
#endif

/// A cached file sent region by region (`ResponseChannel.file`), over a
/// real socket: a warm file from the event loop without its writability
/// flipping per region, and with the usual write-buffer marks (which bound
/// what a slow client can make the proxy hold from memory) back once it is
/// out; a cold file brought into the page cache on the thread pool and sent
/// with `sendfile` too, not read and written from memory.
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

    /// Counts the body bytes written as file regions and as buffers.
    private final class BodyKinds: ChannelOutboundHandler, Sendable {
        typealias OutboundIn = HTTPServerResponsePart
        let bytes = NIOLockedValueBox((fileRegions: 0, buffers: 0))
        func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
            switch unwrapOutboundIn(data) {
            case .body(.fileRegion(let region)): bytes.withLockedValue { $0.fileRegions += region.readableBytes }
            case .body(.byteBuffer(let buffer)): bytes.withLockedValue { $0.buffers += buffer.readableBytes }
            case .head, .end: break
            }
            context.write(data, promise: promise)
        }
    }

    private struct Served {
        var body: [UInt8]
        var error: (any Error)?
        var marksBefore: ChannelOptions.Types.WriteBufferWaterMark?
        var marksAfter: ChannelOptions.Types.WriteBufferWaterMark?
    }

    /// Serves the file at `path` whole through a `ResponseChannel` to one
    /// client reading through a 256 KiB receive buffer (the regions go out
    /// in many sends), with the handlers `handlers` makes in the pipeline.
    private func serve(_ path: String, size: Int, pool: NIOThreadPool?,
                       handlers: @escaping @Sendable () -> [any ChannelHandler]) async throws -> Served {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let served = NIOLockedValueBox(Served(body: []))
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers(handlers())
                }.map {
                    Task {
                        do {
                            let before = try await channel.getOption(ChannelOptions.writeBufferWaterMark).get()
                            let response = ResponseChannel(channel: channel, keepAlive: true, version: .http1_1,
                                                           closeWatch: CloseWatch(channel),
                                                           fileIO: pool.map { NonBlockingFileIO(threadPool: $0) },
                                                           pool: pool)
                            let fd = open(path, O_RDONLY)
                            guard fd >= 0 else { throw IOError(errnoCode: errno, reason: "open") }
                            let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: fd)
                            defer { try? handle.close() }
                            response.head(.ok, ["content-length": String(size)])
                            try await response.file(handle, range: 0..<Int64(size))
                            try await response.end()
                            let after = try await channel.getOption(ChannelOptions.writeBufferWaterMark).get()
                            served.withLockedValue { ($0.marksBefore, $0.marksAfter) = (before, after) }
                        } catch {
                            served.withLockedValue { $0.error = error }
                        }
                        channel.close(promise: nil)
                    }
                    return ()
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { Task { try? await group.shutdownGracefully() } }
        let port = try XCTUnwrap(server.localAddress?.port)
        let client = try RawSocket(port: port)
        var buffer: Int32 = 256 << 10
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &buffer, socklen_t(MemoryLayout<Int32>.size))
        XCTAssertTrue(client.receiveHead().hasPrefix("HTTP/1.1 200"))
        let body = client.receive(limit: size + 1)
        client.close()
        try await server.close()
        return served.withLockedValue { $0.body = body; return $0 }
    }

    private func makeFile(_ bytes: [UInt8]) throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("regions-\(UUID()).bin").path
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        return path
    }

    func testAWarmFileGoesOutWithoutFlippingWritabilityAndTheUsualMarksComeBack() async throws {
        let size = 16 << 20  // four regions
        let bytes = F.randomBytes(size)
        let path = try makeFile(bytes)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let counter = WritabilityCounter()
        // No thread pool: no page-cache check, so this VM's reclaim of a
        // page cannot send a region the cold way.
        let served = try await serve(path, size: size, pool: nil, handlers: { [HTTPResponseEncoder(), counter] })
        XCTAssertNil(served.error)
        XCTAssertEqual(served.body.count, size)
        XCTAssertTrue(served.body == bytes, "every byte right")
        XCTAssertNotNil(served.marksBefore)
        XCTAssertEqual(served.marksAfter?.low, served.marksBefore?.low, "the usual low mark is back")
        XCTAssertEqual(served.marksAfter?.high, served.marksBefore?.high, "the usual high mark is back")
        // Before: two flips per 4 MiB region (above the high mark when
        // queued, below the low one when written), eight here.
        XCTAssertEqual(counter.changes.withLockedValue { $0 }, 0, "no flip per region")
    }

    func testAColdFileIsBroughtIntoThePageCacheAndSentWithSendfile() async throws {
        let size = 12 << 20 + 12_345  // three regions and a piece
        let bytes = F.randomBytes(size)
        let path = try makeFile(bytes)
        defer { try? FileManager.default.removeItem(atPath: path) }
        // Written back, then dropped from the page cache.
        let fd = open(path, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
        XCTAssertFalse(PageCache.isResident(fd: fd, offset: 0, length: Int64(size)), "the file is cold")
        close(fd)
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        let kinds = BodyKinds()
        let served = try await serve(path, size: size, pool: pool, handlers: { [HTTPResponseEncoder(), kinds] })
        try await pool.shutdownGracefully()
        XCTAssertNil(served.error)
        XCTAssertEqual(served.body.count, size)
        XCTAssertTrue(served.body == bytes, "every byte right")
        // Before: every cold region read on the pool and written from memory.
        let (fileRegions, buffers) = kinds.bytes.withLockedValue { $0 }
        XCTAssertEqual(fileRegions, size, "every byte by sendfile")
        XCTAssertEqual(buffers, 0, "none copied through memory")
    }
}
