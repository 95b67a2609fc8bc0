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
    private let write: @Sendable (String) -> Void

    /// Off below `info` (`log_level: notice` and up), as the level is now
    /// (a reload may change it).
    public var enabled: Bool { level.showsInfo }

    public init(format: LogFormat, level: LogLevelSetting,
                write: @escaping @Sendable (String) -> Void = { LogWriter.requestLines.append($0) }) {
        self.format = format
        self.level = level
        self.write = write
    }

    /// Callers check `enabled` first (before building the entry).
    func record(_ entry: Entry) {
        write(Self.line(entry, format: format, time: Date()))
    }

    static func line(_ entry: Entry, format: LogFormat, time: Date) -> String {
        let path = String(RequestURI.path(of: entry.uri))
        let duration = LogWriter.seconds(entry.seconds)
        switch format {
        case .text:
            // Appended piece by piece into one buffer: this runs per request.
            var line = ""
            line.reserveCapacity(160 + path.utf8.count)
            line += LogWriter.timestamp(time)
            line += " "
            line += LogWriter.token(entry.client ?? "")
            line += " "
            line += LogWriter.token(entry.method)
            line += " "
            line += LogWriter.token(path)
            line += " host="
            line += LogWriter.token(entry.host ?? "")
            line += " upstream="
            line += LogWriter.token(entry.upstream ?? "")
            line += " status="
            line += String(entry.status)
            line += " bytes="
            line += String(entry.bytes)
            line += " duration="
            line += duration
            line += " answer="
            line += entry.answer.rawValue
            if entry.cut { line += " cut" }
            line += "\n"
            return line
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
