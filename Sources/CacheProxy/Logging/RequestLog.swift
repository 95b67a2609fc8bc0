import Foundation

/// One line per request at `info` (DESIGN: operators see what the proxy
/// does): who asked what, what it got, and how it was answered.
///
/// What never goes in: the query (it may carry a token in a signed URL),
/// `Authorization`, cookies, or any other header but `Host`.
public struct RequestLog: Sendable {
    /// How a request was answered.
    public enum Answer: String, Sendable {
        /// From a complete cached file (or memory), no upstream bytes.
        case hit
        /// It started the upstream download.
        case miss
        /// It followed a download another request started.
        case joined
        /// From the cache while the upstream could not be asked.
        case offline
        case passthrough
        /// `/metrics`, `/healthz`, `/readyz`.
        case local
        /// The proxy's own error (bad request, unknown host, overload).
        case error
    }

    public struct Entry: Sendable {
        var client: String?
        var method: String
        var uri: String
        var host: String?
        var upstream: String?
        var status: Int
        var bytes: Int64
        var seconds: Double
        var answer: Answer
        /// The answer was cut short (a failed download, a client gone).
        var cut = false
    }

    public let format: LogFormat
    private let level: LogLevelSetting
    private let write: @Sendable ([UInt8]) -> Void

    /// Off below `info` (`log_level: notice` and up), as the level is now
    /// (a reload may change it).
    public var enabled: Bool { level.showsInfo }

    public init(format: LogFormat, level: LogLevelSetting,
                write: @escaping @Sendable ([UInt8]) -> Void = { LogWriter.requestLines.append(bytes: $0) }) {
        self.format = format
        self.level = level
        self.write = write
    }

    /// Callers check `enabled` first (before building the entry).
    func record(_ entry: Entry) {
        switch format {
        case .text: write(Self.textLine(entry, time: Date()))
        case .json: write(Array(Self.line(entry, format: .json, time: Date()).utf8))
        }
    }

    /// A text line's bytes, appended piece by piece into one array: this
    /// runs per request, hits included, so no `String` is made on the way.
    static func textLine(_ entry: Entry, time: Date) -> [UInt8] {
        var line: [UInt8] = []
        line.reserveCapacity(192 + entry.uri.utf8.count)
        LogWriter.appendTimestamp(time, to: &line)
        line.append(UInt8(ascii: " "))
        LogWriter.appendToken(entry.client, to: &line)
        line.append(UInt8(ascii: " "))
        LogWriter.appendToken(entry.method, to: &line)
        line.append(UInt8(ascii: " "))
        var uri = entry.uri
        uri.withUTF8 { LogWriter.appendToken(RequestURI.path(of: $0), to: &line) }
        LogWriter.appendLiteral(" host=", to: &line)
        LogWriter.appendToken(entry.host, to: &line)
        LogWriter.appendLiteral(" upstream=", to: &line)
        LogWriter.appendToken(entry.upstream, to: &line)
        LogWriter.appendLiteral(" status=", to: &line)
        LogWriter.appendDecimal(Int64(entry.status), to: &line)
        LogWriter.appendLiteral(" bytes=", to: &line)
        LogWriter.appendDecimal(entry.bytes, to: &line)
        LogWriter.appendLiteral(" duration=", to: &line)
        let micros = Int64((max(0, entry.seconds) * 1_000_000).rounded())
        LogWriter.appendDecimal(micros / 1_000_000, to: &line)
        line.append(UInt8(ascii: "."))
        LogWriter.appendDecimal(micros % 1_000_000, width: 6, to: &line)
        LogWriter.appendLiteral(" answer=", to: &line)
        var answer = entry.answer.rawValue
        answer.withUTF8 { line.append(contentsOf: $0) }
        if entry.cut { LogWriter.appendLiteral(" cut", to: &line) }
        line.append(UInt8(ascii: "\n"))
        return line
    }

    static func line(_ entry: Entry, format: LogFormat, time: Date) -> String {
        let path = String(RequestURI.path(of: entry.uri))
        let duration = LogWriter.seconds(entry.seconds)
        switch format {
        case .text:
            return String(decoding: textLine(entry, time: time), as: UTF8.self)
        case .json:
            var fields = [
                "\"time\":\(LogWriter.json(LogWriter.timestamp(time)))",
                "\"type\":\"request\"",
                "\"client\":\(entry.client.map(LogWriter.json) ?? "null")",
                "\"method\":\(LogWriter.json(entry.method))",
                "\"path\":\(LogWriter.json(path))",
                "\"host\":\(entry.host.map(LogWriter.json) ?? "null")",
                "\"upstream\":\(entry.upstream.map(LogWriter.json) ?? "null")",
                "\"status\":\(entry.status)",
                "\"bytes\":\(entry.bytes)",
                "\"duration_seconds\":\(duration)",
            ]
            fields.append("\"answer\":\(LogWriter.json(entry.answer.rawValue))")
            fields.append("\"cut\":\(entry.cut)")
            return "{" + fields.joined(separator: ",") + "}\n"
        }
    }
}
