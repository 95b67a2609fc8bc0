import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Writes whole log lines to standard error, one `write` each, so that lines
/// from different threads never interleave (a line of up to `PIPE_BUF`
/// bytes is atomic on a pipe; journald and container runtimes read one).
public enum LogWriter {
    public static func write(_ line: String) {
        var line = line
        line.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let n = Glibc.write(STDERR_FILENO, bytes.baseAddress.map { $0 + offset }, bytes.count - offset)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return }  // nowhere to log to: nothing to do about it
                offset += n
            }
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
        var out = ""
        for scalar in text.unicodeScalars {
            out.unicodeScalars.append(scalar.value > 0x20 && scalar.value < 0x7f && scalar != "\"" ? scalar : "_")
        }
        return out
    }

    /// RFC 3339 in UTC with milliseconds, as log shippers expect.
    public static func timestamp(_ date: Date = Date()) -> String {
        var seconds = time_t(date.timeIntervalSince1970)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let millis = Int((date.timeIntervalSince1970 - Double(seconds)) * 1000)
        return String(format: "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", Int(parts.tm_year) + 1900, Int(parts.tm_mon) + 1,
                      Int(parts.tm_mday), Int(parts.tm_hour), Int(parts.tm_min), Int(parts.tm_sec), max(0, min(999, millis)))
    }
}
