// The least a SwiftNIO server can do for a cold fill, to show where the
// floor of the proxy's miss path lies on this machine: for each client
// request, a GET of the same path on a new upstream connection of the same
// event loop, whose body is read in up to READ_KIB pieces (the socket wakes
// the loop only once LOWAT_KIB are there, `SO_RCVLOWAT`), hashed
// (SHA-256) and written to a file on the loop in 1 MiB batches, each batch
// then sent to the client by `sendfile`. One thread does it all, as one
// nginx worker does. No parsing beyond the answer's Content-Length, no
// checks, no backpressure, no errors handled: a measuring tool for one
// curl at a time, never a server.
//
//   fill-floor LISTEN_PORT ORIGIN_PORT FOLDER
// Environment: FLOOR_READ_KIB (1024), FLOOR_LOWAT_KIB (256; 0: not set),
// FLOOR_HASH (1; 0: no SHA-256, the floor of the IO alone), FLOOR_HANDOFF
// (0; 1: each 1 MiB batch is handed to a task, which hashes and writes it
// and asks the loop to send it: one hop each way per batch, as a fill that
// keeps its hashing and writing off the loop would).
// FLOOR_SERVE=FILE: no upstream at all; every request on a kept-alive
// connection is answered with FILE, its head and then 4 MiB `FileRegion`s
// queued at once (NIO's `sendfile` path and nothing else), on two event
// loops: the least a SwiftNIO server does for a large cached blob
// (`benchmarks/big_ab.sh` with FLOOR=1).
import Crypto
import Foundation
import NIOCore
import NIOPosix

let arguments = CommandLine.arguments
guard arguments.count == 4, let port = Int(arguments[1]), let originPort = Int(arguments[2]) else {
    print("usage: fill-floor LISTEN_PORT ORIGIN_PORT FOLDER")
    exit(2)
}
enum Settings { static let origin = Int(CommandLine.arguments[2]) ?? 0 }
let folder = arguments[3]
let environment = ProcessInfo.processInfo.environment
let readSize = (Int(environment["FLOOR_READ_KIB"] ?? "") ?? 1024) * 1024
let lowWater = (Int(environment["FLOOR_LOWAT_KIB"] ?? "") ?? 256) * 1024
let hashing = environment["FLOOR_HASH"] != "0"
let handOff = environment["FLOOR_HANDOFF"] == "1"
let batchSize = 1 << 20
let serveFile = environment["FLOOR_SERVE"]

/// One fill: the upstream's answer, its body into a file and on to the client.
final class FillHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let client: any Channel
    var head = ByteBuffer()
    var remaining = -1
    var batch = ByteBuffer()
    var written: Int64 = 0
    var hasher = SHA256()
    var file: NIOFileHandle?
    var fd: CInt = -1
    var count = 0

    init(client: any Channel) { self.client = client }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        if remaining < 0 {
            head.writeBuffer(&buffer)
            guard let text = head.getString(at: head.readerIndex, length: head.readableBytes),
                  let end = text.range(of: "\r\n\r\n") else { return }
            let headText = text[..<end.lowerBound].lowercased()
            let length = headText.split(separator: "\r\n").first { $0.hasPrefix("content-length:") }
                .flatMap { Int($0.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces)) } ?? 0
            let headBytes = text.utf8.distance(from: text.startIndex, to: end.upperBound)
            head.moveReaderIndex(forwardBy: headBytes)
            buffer = head
            remaining = length
            let path = "\(folder)/fill.\(ObjectIdentifier(self).hashValue)"
            fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o644)
            file = try? NIOFileHandle(_deprecatedPath: path)
            unlink(path)
            var out = client.allocator.buffer(capacity: 128)
            out.writeString("HTTP/1.1 200 OK\r\nContent-Length: \(length)\r\nConnection: close\r\n\r\n")
            client.write(out, promise: nil)
        }
        remaining -= buffer.readableBytes
        if hashing && !handOff { buffer.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) } }
        if batch.readableBytes == 0 && buffer.readableBytes >= batchSize {
            flush(buffer)
        } else {
            batch.writeBuffer(&buffer)
            if batch.readableBytes >= batchSize || remaining <= 0 {
                flush(batch)
                // A batch handed to the task is its now: a new one here, not
                // a copy of the old on the next write.
                if handOff { batch = client.allocator.buffer(capacity: batchSize) } else { batch.clear() }
            }
        }
        if remaining <= 0 {
            if handOff { batches?.finish(); return context.close(promise: nil) }
            if hashing { _ = hasher.finalize() }
            client.close(mode: .output, promise: nil)
            close(fd)
            let file = self.file
            client.closeFuture.whenComplete { _ in try? file?.close() }
            context.close(promise: nil)
        } else {
            setLowWater(context.channel, min(lowWater, remaining))
        }
    }

    /// The hand-off mode's batches, and the task that takes them.
    var batches: AsyncStream<ByteBuffer>.Continuation?

    func startTask() {
        let (stream, continuation) = AsyncStream<ByteBuffer>.makeStream()
        batches = continuation
        let (client, fd, file) = (self.client, self.fd, self.file)
        Task {
            var hasher = SHA256()
            var written: Int64 = 0
            for await batch in stream {
                batch.withUnsafeReadableBytes { bytes in
                    if hashing { hasher.update(bufferPointer: bytes) }
                    _ = pwrite(fd, bytes.baseAddress, bytes.count, off_t(written))
                }
                guard let file else { continue }
                let region = FileRegion(fileHandle: file, readerIndex: Int(written), endIndex: Int(written) + batch.readableBytes)
                written += Int64(batch.readableBytes)
                client.eventLoop.execute { client.writeAndFlush(region, promise: nil) }
            }
            if hashing { _ = hasher.finalize() }
            close(fd)
            client.eventLoop.execute {
                client.close(mode: .output, promise: nil)
                client.closeFuture.whenComplete { _ in try? file?.close() }
            }
        }
    }

    /// Writes the batch at the file's end and sends that range from the file.
    func flush(_ bytes: ByteBuffer) {
        if handOff {
            if batches == nil { startTask() }
            batches?.yield(bytes)
            return
        }
        let length = bytes.readableBytes
        guard length > 0, let file else { return }
        bytes.withUnsafeReadableBytes { _ = pwrite(fd, $0.baseAddress, $0.count, off_t(written)) }
        let region = FileRegion(fileHandle: file, readerIndex: Int(written), endIndex: Int(written) + length)
        written += Int64(length)
        client.writeAndFlush(region, promise: nil)
    }
}

func setLowWater(_ channel: any Channel, _ bytes: Int) {
    guard lowWater > 0 else { return }
    _ = (channel as? any SocketOptionProvider)?.unsafeSetSocketOption(level: .socket, name: .init(rawValue: SO_RCVLOWAT),
                                                                       value: CInt(max(1, bytes)))
}

/// The client side: one read is one request.
final class ClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    /// FLOOR_SERVE's file, opened once per connection.
    var served: NIOFileHandle?

    func channelInactive(context: ChannelHandlerContext) {
        try? served?.close()
        served = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let request = unwrapInboundIn(data)
        if let serveFile { return serve(serveFile, context: context) }
        guard let line = request.getString(at: request.readerIndex, length: request.readableBytes)?
            .split(separator: "\r\n").first else { return }
        let path = line.split(separator: " ").dropFirst().first.map(String.init) ?? "/"
        let client = context.channel
        ClientBootstrap(group: context.eventLoop)
            .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64 * 1024, initial: readSize, maximum: readSize))
            .channelOption(.maxMessagesPerRead, value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(FillHandler(client: client)) }
            }
            .connect(host: "127.0.0.1", port: Settings.origin)
            .whenSuccess { upstream in
                var ask = upstream.allocator.buffer(capacity: 256)
                ask.writeString("GET \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(Settings.origin)\r\nConnection: close\r\n\r\n")
                upstream.writeAndFlush(ask, promise: nil)
            }
    }
}

extension ClientHandler {
    func serve(_ path: String, context: ChannelHandlerContext) {
        if served == nil { served = try? NIOFileHandle(_deprecatedPath: path) }
        guard let served, let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int else {
            return context.close(promise: nil)
        }
        var head = context.channel.allocator.buffer(capacity: 64)
        head.writeString("HTTP/1.1 200 OK\r\nContent-Length: \(size)\r\n\r\n")
        context.write(NIOAny(IOData.byteBuffer(head)), promise: nil)
        var offset = 0
        while offset < size {
            let end = min(size, offset + 4 << 20)
            context.write(NIOAny(IOData.fileRegion(FileRegion(fileHandle: served, readerIndex: offset, endIndex: end))),
                          promise: nil)
            offset = end
        }
        context.flush()
    }
}

let group = MultiThreadedEventLoopGroup(numberOfThreads: serveFile == nil ? 1 : 2)
let server = try ServerBootstrap(group: group)
    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
    .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
    .childChannelInitializer { channel in
        channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(ClientHandler()) }
    }
    .bind(host: "127.0.0.1", port: port).wait()
try server.closeFuture.wait()
