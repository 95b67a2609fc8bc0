import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A blocking TCP client for the tests that must send what no HTTP client
/// library would: broken request lines, huge heads, heads one byte at a time.
final class RawSocket {
    let fd: Int32
    private var closed = false

    init(port: Int, host: String = "127.0.0.1", receiveTimeout: TimeInterval = 10) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr(host)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        let result = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard result == 0 else {
            Glibc.close(fd)
            throw TestError("connect to \(port) failed")
        }
        var tv = timeval(tv_sec: Int(receiveTimeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Sends everything; false when the peer closed the connection.
    @discardableResult
    func send(_ text: String) -> Bool {
        send(Array(text.utf8))
    }

    @discardableResult
    func send(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0, errno == EINTR { continue }
            if n <= 0 { return false }
            offset += n
        }
        return true
    }

    /// Reads until the peer closes or `limit` bytes arrived or the receive
    /// timeout passed.
    func receive(limit: Int = 1 << 20) -> [UInt8] {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let n = recv(fd, &buffer, buffer.count, 0)
            // A receive timeout makes recv return EINTR on any signal
            // (no SA_RESTART for it): that is not the peer closing.
            if n < 0, errno == EINTR { continue }
            if n <= 0 { break }
            out.append(contentsOf: buffer[..<n])
        }
        return out
    }

    /// Reads one response head (up to the blank line).
    func receiveHead() -> String {
        var out: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let n = recv(fd, &byte, 1, 0)
            if n < 0, errno == EINTR { continue }
            guard n == 1 else { break }
            out.append(byte)
            if out.count >= 4, out.suffix(4) == [13, 10, 13, 10] { break }
        }
        return String(decoding: out, as: UTF8.self)
    }

    func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(fd)
    }

    deinit { close() }
}
