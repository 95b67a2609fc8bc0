import Foundation
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// Writes whole log lines to standard error, one `write` each, so that lines
/// from different threads never interleave (a line of up to `PIPE_BUF`
/// bytes is atomic on a pipe; journald and container runtimes read one).
public enum LogWriter {
    public static func write(_ line: String) {
        var line = line
        line.withUTF8 { write(bytes: UnsafeRawBufferPointer($0)) }
    }

    static func write(bytes: UnsafeRawBufferPointer, to fd: Int32 = STDERR_FILENO) {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress.map { $0 + offset }, bytes.count - offset)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }  // nowhere to log to: nothing to do about it
            offset += n
        }
    }

    /// `text` as a JSON string, quotes included: every control character
    /// escaped, so a header value can never break a line or an object.
    public static func json(_ text: String) -> String {
        var out = "\""
        out.reserveCapacity(text.utf8.count + 2)
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7f:
                out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// `text` for a text line: printable, no spaces or quotes to confuse a
    /// reader (a `Host` header is the client's to choose).
    public static func token(_ text: String) -> String {
        guard !text.isEmpty else { return "-" }
        // Almost every value is clean already: then it is used as it is.
        if text.utf8.allSatisfy(isTokenByte) { return text }
        var out = ""
        for scalar in text.unicodeScalars {
            out.unicodeScalars.append(scalar.value > 0x20 && scalar.value < 0x7f && scalar != "\"" ? scalar : "_")
        }
        return out
    }

    /// Printable, not a space, not a quote: kept as it is in a text line.
    private static func isTokenByte(_ byte: UInt8) -> Bool { byte > 0x20 && byte < 0x7f && byte != UInt8(ascii: "\"") }

    /// `token`, appended as bytes: clean bytes as they are, anything else
    /// (a space, a quote, a control byte, non-ASCII) as `_`; nothing or
    /// nil as `-`.
    static func appendToken(_ text: String?, to line: inout [UInt8]) {
        guard var text else { return line.append(UInt8(ascii: "-")) }
        // Through the string's own buffer (strings from the network have
        // one): one check and one copy of the bytes, where the UTF-8 view's
        // generic walk, and then a substring's storage look-up, cost ~450
        // instructions a field (`benchmarks/callgrind.sh`).
        text.withUTF8 { appendToken($0, to: &line) }
    }

    /// The same for bytes already at hand.
    static func appendToken(_ bytes: UnsafeBufferPointer<UInt8>, to line: inout [UInt8]) {
        guard !bytes.isEmpty else { return line.append(UInt8(ascii: "-")) }
        if bytes.allSatisfy(isTokenByte) { return line.append(contentsOf: bytes) }
        line.append(contentsOf: token(String(decoding: bytes, as: UTF8.self)).utf8)
    }

    /// A literal's bytes: one copy, where `append(contentsOf: "...".utf8)`
    /// walked the view generically, ~165 instructions a piece on a line of
    /// seven (`benchmarks/callgrind.sh`).
    static func appendLiteral(_ literal: StaticString, to line: inout [UInt8]) {
        literal.withUTF8Buffer { line.append(contentsOf: $0) }
    }

    /// A non-negative integer in decimal, zero-padded to `width`.
    static func appendDecimal(_ value: Int64, width: Int = 1, to line: inout [UInt8]) {
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var count = 0
        var rest = value.magnitude
        withUnsafeMutableBytes(of: &digits) { buffer in
            repeat {
                buffer[19 - count] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
                count += 1
            } while rest > 0 && count < 20
            while count < min(width, 20) {
                buffer[19 - count] = UInt8(ascii: "0")
                count += 1
            }
            if value < 0 { line.append(UInt8(ascii: "-")) }
            // As typed bytes: a slice of raw ones was copied through a
            // generic walk, ~240 instructions a number.
            let bytes = buffer.assumingMemoryBound(to: UInt8.self)
            line.append(contentsOf: UnsafeBufferPointer(rebasing: bytes[(20 - count)...]))
        }
    }

    /// `timestamp`, appended as bytes.
    static func appendTimestamp(_ date: Date, to line: inout [UInt8]) {
        var seconds = time_t(date.timeIntervalSince1970)
        let millis = max(0, min(999, Int64((date.timeIntervalSince1970 - Double(seconds)) * 1000)))
        let prefix = lastSecond.withLockedValue { last -> String in
            if last.seconds == seconds { return last.text }
            var parts = tm()
            gmtime_r(&seconds, &parts)
            let text = "\(padded(Int(parts.tm_year) + 1900, 4))-\(padded(Int(parts.tm_mon) + 1, 2))-\(padded(Int(parts.tm_mday), 2))T"
                + "\(padded(Int(parts.tm_hour), 2)):\(padded(Int(parts.tm_min), 2)):\(padded(Int(parts.tm_sec), 2))"
            last = LastSecond(seconds: seconds, text: text)
            return text
        }
        var prefixBytes = prefix
        prefixBytes.withUTF8 { line.append(contentsOf: $0) }
        line.append(UInt8(ascii: "."))
        appendDecimal(millis, width: 3, to: &line)
        line.append(UInt8(ascii: "Z"))
    }

    /// RFC 3339 in UTC with milliseconds, as log shippers expect. Built
    /// from integers: it runs once per request.
    public static func timestamp(_ date: Date = Date()) -> String {
        var bytes: [UInt8] = []
        appendTimestamp(date, to: &bytes)
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The formatted second of the last line: a struct, not a tuple, whose
    /// box's type the compiler knows (a tuple's generic metadata was looked
    /// up at run time on every line, half of the line's cost).
    private struct LastSecond {
        var seconds: time_t
        var text: String
    }
    private static let lastSecond = NIOLockedValueBox(LastSecond(seconds: -1, text: ""))

    /// Seconds with six decimals, without `String(format:)`.
    static func seconds(_ value: Double) -> String {
        let micros = Int((max(0, value) * 1_000_000).rounded())
        return "\(micros / 1_000_000).\(padded(micros % 1_000_000, 6))"
    }

    static func padded(_ value: Int, _ width: Int) -> String {
        let text = String(value)
        return text.count >= width ? text : String(repeating: "0", count: width - text.count) + text
    }

    /// Request lines, written by a thread of their own: a request never
    /// waits for standard error (a slow journald, a blocking container log
    /// driver, a full pipe would otherwise stall the event loops). At most
    /// `LineBuffer.limit` bytes wait; past that, lines are dropped and
    /// counted, and the count is written when there is room again.
    public static let requestLines = LineBuffer()
}

public final class LineBuffer: Sendable {
    private struct State {
        /// The lines' bytes, back to back: one copy per line, no String kept.
        var bytes: [UInt8] = []
        var dropped = 0
        var started = false
    }

    static let limit = 4 << 20
    private let state = NIOLockedValueBox(State())

    public func append(bytes line: [UInt8]) {
        let start = state.withLockedValue { state -> Bool in
            guard state.bytes.count + line.count <= Self.limit else {
                state.dropped += 1
                return false
            }
            state.bytes.append(contentsOf: line)
            defer { state.started = true }
            return !state.started
        }
        if start {
            let thread = Thread { [self] in
                while true {
                    usleep(20_000)
                    flush()
                }
            }
            thread.name = "cache-proxy-log"
            thread.start()
        }
    }

    /// Writes what waits, now (also at shutdown).
    public func flush() {
        let (bytes, dropped) = state.withLockedValue { state -> ([UInt8], Int) in
            if state.bytes.isEmpty && state.dropped == 0 { return ([], 0) }  // the usual idle wake
            defer {
                state.bytes = []
                state.bytes.reserveCapacity(64 * 1024)
                state.dropped = 0
            }
            return (state.bytes, state.dropped)
        }
        if dropped > 0 { LogWriter.write("\(dropped) request log lines dropped: standard error did not keep up\n") }
        guard !bytes.isEmpty else { return }
        bytes.withUnsafeBufferPointer { LogWriter.write(bytes: UnsafeRawBufferPointer($0)) }
    }
}
