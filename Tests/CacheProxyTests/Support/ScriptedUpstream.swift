import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// An upstream that answers each request head with bytes written verbatim,
/// for framings no HTTP library writes on purpose (a `HEAD` answer framed
/// close-delimited, say). `answer` gets the request line and returns the
/// bytes, and whether to close the connection after them.
final class ScriptedUpstream: Sendable {
    private let channel: any Channel
    let port: Int

    init(_ answer: @escaping @Sendable (String) -> (bytes: String, close: Bool)) async throws {
        channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Handler(answer: answer))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        port = channel.localAddress?.port ?? 0
    }

    func stop() async {
        try? await channel.close()
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let answer: @Sendable (String) -> (bytes: String, close: Bool)
        var pending = ""

        init(answer: @escaping @Sendable (String) -> (bytes: String, close: Bool)) { self.answer = answer }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            pending += String(buffer: unwrapInboundIn(data))
            // Requests without bodies only: a head ends at the blank line.
            while let end = pending.range(of: "\r\n\r\n") {
                let head = String(pending[..<end.lowerBound])
                pending = String(pending[end.upperBound...])
                let line = head.split(separator: "\r\n").first.map(String.init) ?? ""
                let (bytes, close) = answer(line)
                context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: bytes)), promise: nil)
                if close {
                    context.close(promise: nil)
                    return
                }
            }
        }
    }
}
