import Foundation
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

// Slow peers for the tests of backpressure, memory and timeouts: a client that
// reads slowly, one that uploads slowly, and a relay that throttles a real
// client (curl, skopeo). All on 127.0.0.1; every loop ends at a deadline, on
// a closed peer, or on `stop`, so no test can hang on them.

/// Seconds on a clock that never jumps, for pacing and deadlines.
private func monotonicNow() -> TimeInterval { ProcessInfo.processInfo.systemUptime }

private func setSocketOption(_ fd: Int32, _ level: Int32, _ name: Int32, _ value: Int) {
    var v = Int32(value)
    setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size))
}

private func loopbackAddress(port: Int) -> sockaddr_in {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    return addr
}

/// A blocking TCP connection to 127.0.0.1:`port`. Buffer sizes are set before
/// `connect` because the TCP window scale is agreed in the handshake: set
/// later, a small SO_RCVBUF would not shrink the window the sender sees.
private func connectLocal(port: Int, receiveBuffer: Int? = nil, sendBuffer: Int? = nil) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestError("socket() failed: errno \(errno)") }
    if let receiveBuffer { setSocketOption(fd, SOL_SOCKET, SO_RCVBUF, receiveBuffer) }
    if let sendBuffer { setSocketOption(fd, SOL_SOCKET, SO_SNDBUF, sendBuffer) }
    let result = withUnsafePointer(to: loopbackAddress(port: port)) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    }
    guard result == 0 else { Glibc.close(fd); throw TestError("connect to \(port) failed") }
    setSocketOption(fd, Int32(IPPROTO_TCP), TCP_NODELAY, 1)
    return fd
}

/// Sends every byte (blocking); false when the peer is gone. MSG_NOSIGNAL: a
/// closed peer must fail the send, not kill the test process with SIGPIPE.
private func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
    var offset = 0
    while offset < bytes.count {
        let n = Glibc.send(fd, bytes.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
        if n < 0, errno == EINTR { continue }
        if n <= 0 { return false }
        offset += n
    }
    return true
}

private enum Received { case bytes(Int), nothing, closed }

/// Waits up to `waitMilliseconds` for data, then takes at most `limit` bytes
/// without blocking. `.closed` is an orderly close (recv 0) or a reset alike.
private func receiveSome(_ fd: Int32, into buffer: inout [UInt8], limit: Int, waitMilliseconds: Int32) -> Received {
    var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
    guard poll(&p, 1, waitMilliseconds) > 0 else { return .nothing }  // timeout or EINTR
    let n = recv(fd, &buffer, min(limit, buffer.count), Int32(MSG_DONTWAIT))
    if n > 0 { return .bytes(n) }
    if n < 0, errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK { return .nothing }
    return .closed
}

/// Paces a byte stream to an average rate: a token bucket refilled
/// continuously, with pieces of about 10 ms worth. It holds at most two pieces,
/// so an idle spell (a server thinking) never turns into a burst.
private struct Pacer {
    private let rate: Double
    private let piece: Double
    private var tokens = 0.0
    private var last = monotonicNow()

    init(bytesPerSecond: Int) {
        rate = Double(max(1, bytesPerSecond))
        piece = max(1, rate / 100)
    }

    /// Sleeps (at most 20 ms) until a piece may pass; returns its size, at
    /// most `limit`, possibly 0 (callers just ask again).
    mutating func next(upTo limit: Int) -> Int {
        refill()
        let want = min(piece, Double(limit))
        if tokens < want {
            usleep(useconds_t(min((want - tokens) / rate, 0.02) * 1_000_000))
            refill()
        }
        return min(limit, Int(tokens))
    }

    mutating func spend(_ count: Int) { tokens -= Double(count) }

    private mutating func refill() {
        let now = monotonicNow()
        tokens = min(2 * piece, tokens + (now - last) * rate)
        last = now
    }
}

/// What a `SlowReader` got.
struct SlowReadResult: Sendable {
    let bytes: [UInt8]
    /// The server closed or reset the connection (rather than limit/deadline).
    let closedByPeer: Bool
    let seconds: Double

    /// Length of the response head including the blank line; everything when
    /// there is no blank line.
    private var headLength: Int {
        let marker: [UInt8] = [13, 10, 13, 10]
        guard bytes.count >= 4 else { return bytes.count }
        for i in 0...(bytes.count - 4) where bytes[i..<(i + 4)].elementsEqual(marker) { return i + 4 }
        return bytes.count
    }

    var head: String { String(decoding: bytes[..<headLength], as: UTF8.self) }
    var body: [UInt8] { Array(bytes[headLength...]) }
    var statusCode: Int? {
        let parts = head.split(maxSplits: 2, whereSeparator: { $0 == " " || $0.isNewline })
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/") else { return nil }
        return Int(parts[1])
    }
}

/// A client on a slow link: a small receive buffer (so the server sees a small
/// TCP window and its writes really block) and reads at a fixed average rate.
final class SlowReader: @unchecked Sendable {
    let fd: Int32
    private var closed = false

    init(port: Int, receiveBuffer: Int = 4096) throws {
        fd = try connectLocal(port: port, receiveBuffer: receiveBuffer)
    }

    /// Sends the request; false when the peer closed the connection.
    @discardableResult
    func send(_ text: String) -> Bool {
        Array(text.utf8).withUnsafeBytes { sendAll(fd, $0) }
    }

    /// Reads about `bytesPerSecond` (a piece every ~10 ms) until the peer
    /// closes, `limit` bytes arrived, or `deadline` seconds passed.
    func read(bytesPerSecond: Int, limit: Int = Int.max, deadline: TimeInterval) -> SlowReadResult {
        let start = monotonicNow()
        var pacer = Pacer(bytesPerSecond: bytesPerSecond)
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var bytes: [UInt8] = []
        var closedByPeer = false
        reading: while bytes.count < limit, monotonicNow() - start < deadline {
            let allowed = pacer.next(upTo: min(limit - bytes.count, buffer.count))
            guard allowed > 0 else { continue }
            switch receiveSome(fd, into: &buffer, limit: allowed, waitMilliseconds: 10) {
            case .bytes(let n): bytes.append(contentsOf: buffer[..<n]); pacer.spend(n)
            case .nothing: continue
            case .closed: closedByPeer = true; break reading
            }
        }
        return SlowReadResult(bytes: bytes, closedByPeer: closedByPeer, seconds: monotonicNow() - start)
    }

    /// Drains everything as fast as possible until the peer closes or resets
    /// (true) or `timeout` passes (false): did the server cut this client?
    func waitForPeerClose(timeout: TimeInterval) -> Bool {
        let end = monotonicNow() + timeout
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while monotonicNow() < end {
            if case .closed = receiveSome(fd, into: &buffer, limit: buffer.count, waitMilliseconds: 50) { return true }
        }
        return false
    }

    func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(fd)
    }

    deinit { close() }
}

/// A client that sends a request body at a fixed low rate, plain or chunked,
/// optionally stopping part-way (an interrupted upload).
final class SlowUploader {
    private let socket: RawSocket

    init(port: Int) throws { socket = try RawSocket(port: port) }

    /// Sends `head` (request line and headers up to "\r\n\r\n", with
    /// `Transfer-Encoding: chunked` when `chunked`), then `body` in pieces
    /// about every 10 ms. Chunked pieces are framed and ended by "0\r\n\r\n" —
    /// unless `stopAfter` is set: then it stops after that many body bytes
    /// without the terminator. False when a send failed (peer closed).
    @discardableResult
    func upload(head: String, body: [UInt8], bytesPerSecond: Int, chunked: Bool, stopAfter: Int? = nil) -> Bool {
        guard socket.send(head) else { return false }
        let end = min(body.count, stopAfter ?? Int.max)
        var pacer = Pacer(bytesPerSecond: bytesPerSecond)
        var offset = 0
        while offset < end {
            let n = pacer.next(upTo: end - offset)
            guard n > 0 else { continue }
            let piece = Array(body[offset..<(offset + n)])
            let framed = chunked ? Array("\(String(n, radix: 16))\r\n".utf8) + piece + [13, 10] : piece
            guard socket.send(framed) else { return false }
            pacer.spend(n)
            offset += n
        }
        if chunked, stopAfter == nil { return socket.send("0\r\n\r\n") }
        return true
    }

    /// Everything the server sends until it closes or `deadline` seconds pass.
    func receiveAll(deadline: TimeInterval) -> [UInt8] {
        let end = monotonicNow() + deadline
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        var out: [UInt8] = []
        while monotonicNow() < end {
            switch receiveSome(socket.fd, into: &buffer, limit: buffer.count, waitMilliseconds: 50) {
            case .bytes(let n): out.append(contentsOf: buffer[..<n])
            case .nothing: continue
            case .closed: return out
            }
        }
        return out
    }

    func close() { socket.close() }

    deinit { close() }
}

/// A TCP relay standing for a slow network path between a real client (curl,
/// skopeo) and the proxy. Point the client at `port`; bytes go on to
/// `targetPort`, target→client at `downstreamBytesPerSecond` and
/// client→target at `upstreamBytesPerSecond` when given.
final class ThrottledRelay: @unchecked Sendable {
    /// A connection's target fd and how many directions still copy (the last
    /// to end closes both fds).
    private struct Link: Sendable { let target: Int32; var running: Int }

    private struct State: Sendable {
        var stopped = false, acceptLoopEnded = false, accepted = 0
        /// Open connections by client fd. Fds are closed only under the lock,
        /// so `stop` never shuts down a number the kernel already reused.
        var open: [Int32: Link] = [:]
    }

    /// Small socket buffers, so a slow side pushes back to the sender instead
    /// of the relay and the kernel soaking up megabytes.
    private static let socketBuffer = 16 * 1024

    let port: Int
    private let state = NIOLockedValueBox(State())

    var connectionsAccepted: Int { state.withLockedValue { $0.accepted } }

    init(targetPort: Int, downstreamBytesPerSecond: Int, upstreamBytesPerSecond: Int? = nil) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestError("socket() failed: errno \(errno)") }
        setSocketOption(fd, SOL_SOCKET, SO_REUSEADDR, 1)
        // Accepted sockets inherit these: set before listen, the client sees a
        // small window from the handshake on.
        setSocketOption(fd, SOL_SOCKET, SO_RCVBUF, Self.socketBuffer)
        setSocketOption(fd, SOL_SOCKET, SO_SNDBUF, Self.socketBuffer)
        // Non-blocking, so an accept after poll can never block (a client that
        // reset in between); accepted sockets do not inherit it.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        // Port 0: the kernel picks a free port, with no race against others.
        var addr = loopbackAddress(port: 0)
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { ptr -> Int32 in
                guard bind(fd, ptr, length) == 0, listen(fd, 64) == 0 else { return -1 }
                return getsockname(fd, ptr, &length)
            }
        }
        guard bound == 0 else { Glibc.close(fd); throw TestError("relay cannot listen on 127.0.0.1") }
        port = Int(UInt16(bigEndian: addr.sin_port))
        let state = self.state
        Thread {
            ThrottledRelay.acceptLoop(listener: fd, state: state, targetPort: targetPort,
                                      downstream: downstreamBytesPerSecond, upstream: upstreamBytesPerSecond)
        }.start()
    }

    /// Closes the listener and every open connection, and waits (at most 2 s)
    /// until all relay threads ended.
    func stop() {
        let wasRunning = state.withLockedValue { s -> Bool in
            guard !s.stopped else { return false }
            s.stopped = true
            // Wakes threads blocked in send to a peer that never reads.
            for (client, link) in s.open {
                shutdown(client, Int32(SHUT_RDWR))
                shutdown(link.target, Int32(SHUT_RDWR))
            }
            return true
        }
        guard wasRunning else { return }
        let end = monotonicNow() + 2
        while monotonicNow() < end, !state.withLockedValue({ $0.acceptLoopEnded && $0.open.isEmpty }) {
            usleep(5_000)
        }
    }

    deinit { stop() }

    /// Static, capturing no `self`, so the threads never keep the relay alive
    /// and `deinit` can stop them.
    private static func acceptLoop(listener: Int32, state: NIOLockedValueBox<State>, targetPort: Int,
                                   downstream: Int, upstream: Int?) {
        defer {
            Glibc.close(listener)
            state.withLockedValue { $0.acceptLoopEnded = true }
        }
        while !state.withLockedValue({ $0.stopped }) {
            var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            let client = accept(listener, nil, nil)
            guard client >= 0 else { usleep(10_000); continue }
            state.withLockedValue { $0.accepted += 1 }
            guard let target = try? connectLocal(port: targetPort, receiveBuffer: socketBuffer,
                                                 sendBuffer: socketBuffer) else { Glibc.close(client); continue }
            setSocketOption(client, Int32(IPPROTO_TCP), TCP_NODELAY, 1)
            let registered = state.withLockedValue { s -> Bool in
                guard !s.stopped else { return false }
                s.open[client] = Link(target: target, running: 2)
                return true
            }
            guard registered else { Glibc.close(client); Glibc.close(target); return }
            Thread { pump(from: target, to: client, bytesPerSecond: downstream, client: client, state: state) }.start()
            Thread { pump(from: client, to: target, bytesPerSecond: upstream, client: client, state: state) }.start()
        }
    }

    /// Copies `source` → `destination` until the source ends, a send fails or
    /// the relay stops. The rate limit applies before reading, so a fast sender
    /// is held back by TCP flow control rather than queued here.
    private static func pump(from source: Int32, to destination: Int32, bytesPerSecond: Int?,
                             client: Int32, state: NIOLockedValueBox<State>) {
        var pacer = bytesPerSecond.map { Pacer(bytesPerSecond: $0) }
        var buffer = [UInt8](repeating: 0, count: socketBuffer)
        copying: while !state.withLockedValue({ $0.stopped }) {
            let allowed = pacer?.next(upTo: buffer.count) ?? buffer.count
            guard allowed > 0 else { continue }
            switch receiveSome(source, into: &buffer, limit: allowed, waitMilliseconds: 100) {
            case .nothing: continue
            case .closed: break copying
            case .bytes(let n):
                pacer?.spend(n)
                let sent = buffer.withUnsafeBytes { sendAll(destination, UnsafeRawBufferPointer(rebasing: $0[..<n])) }
                if !sent { break copying }
            }
        }
        // Pass the end on: the other side sees EOF after all data, as it
        // would without the relay.
        shutdown(destination, Int32(SHUT_WR))
        state.withLockedValue { s in
            guard var link = s.open[client] else { return }
            link.running -= 1
            s.open[client] = link.running > 0 ? link : nil
            if link.running == 0 { Glibc.close(client); Glibc.close(link.target) }
        }
    }
}
