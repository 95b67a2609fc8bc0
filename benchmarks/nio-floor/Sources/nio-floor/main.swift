// The least a SwiftNIO server can do for a manifest pull by tag, to show
// where the floor of the proxy's own path lies on this machine: for each
// client request, one `HEAD` on a kept-alive upstream connection of the same
// event loop, then a fixed answer from memory. No HTTP parsing, no routing,
// no checks, no logging, no metrics: a request is whatever one read brings,
// the upstream's answer ends at its first CRLF CRLF. Only for wrk's one
// request at a time per connection; never a server. With ORIGIN_PORT 0 it
// asks no upstream and answers every request with the file at once: the
// floor of a cache hit from memory.
//
//   nio-floor LISTEN_PORT ORIGIN_PORT REPOSITORY TAG MANIFEST_FILE MEDIA_TYPE DIGEST
import NIOCore
import NIOPosix
import Foundation

let arguments = CommandLine.arguments
guard arguments.count == 8, let port = Int(arguments[1]), let originPort = Int(arguments[2]),
      let manifest = FileManager.default.contents(atPath: arguments[5]) else {
    print("usage: nio-floor LISTEN_PORT ORIGIN_PORT REPOSITORY TAG MANIFEST_FILE MEDIA_TYPE DIGEST")
    exit(2)
}
enum Settings { static let origin = Int(CommandLine.arguments[2]) ?? 0 }
let ask = "HEAD /v2/\(arguments[3])/manifests/\(arguments[4]) HTTP/1.1\r\nHost: 127.0.0.1:\(originPort)\r\n"
    + "Accept: \(arguments[6])\r\nUser-Agent: nio-floor\r\n\r\n"
let answerHead = "HTTP/1.1 200 OK\r\nContent-Type: \(arguments[6])\r\nContent-Length: \(manifest.count)\r\n"
    + "Docker-Content-Digest: \(arguments[7])\r\n\r\n"
let answer = Array(answerHead.utf8) + Array(manifest)

/// The upstream side: each end of an answer head sends the fixed answer to
/// the client.
final class UpstreamHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    var client: (any Channel)?
    var tail: UInt32 = 0

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = unwrapInboundIn(data)
        var ends = 0
        buffer.withUnsafeReadableBytes { bytes in
            for byte in bytes {
                tail = tail << 8 | UInt32(byte)
                if tail == 0x0D0A_0D0A { ends += 1 }
            }
        }
        guard let client else { return }
        for _ in 0..<ends {
            var out = client.allocator.buffer(capacity: answer.count)
            out.writeBytes(answer)
            client.writeAndFlush(out, promise: nil)
        }
    }
}

/// The client side: each read is one request, asked of the upstream.
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    var upstream: (any Channel)?
    var waiting = 0

    func channelActive(context: ChannelHandlerContext) {
        // Origin port 0: no upstream, every request answered from memory
        // (the floor of a cache hit).
        guard Settings.origin != 0 else { return context.fireChannelActive() }
        let client = context.channel
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        ClientBootstrap(group: context.eventLoop)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = UpstreamHandler()
                    handler.client = client
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: "127.0.0.1", port: Settings.origin)
            .assumeIsolated().whenComplete { result in
                let me = loopBound.value
                guard case .success(let channel) = result else { client.close(promise: nil); return }
                me.upstream = channel
                for _ in 0..<me.waiting { me.sendAsk() }
                me.waiting = 0
            }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard Settings.origin != 0 else {
            var out = context.channel.allocator.buffer(capacity: answer.count)
            out.writeBytes(answer)
            context.writeAndFlush(NIOAny(out), promise: nil)
            return
        }
        if upstream == nil { waiting += 1 } else { sendAsk() }
    }

    func channelInactive(context: ChannelHandlerContext) {
        upstream?.close(promise: nil)
    }

    func sendAsk() {
        guard let upstream else { return }
        var out = upstream.allocator.buffer(capacity: ask.utf8.count)
        out.writeString(ask)
        upstream.writeAndFlush(out, promise: nil)
    }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
let server = try ServerBootstrap(group: group)
    .serverChannelOption(.backlog, value: 256)
    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ClientHandler()) }
    }
    .bind(host: "127.0.0.1", port: port).wait()
try server.closeFuture.wait()
