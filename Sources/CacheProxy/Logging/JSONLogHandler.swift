import Foundation
import Logging

/// swift-log's lines as one JSON object each (`log_format: json`), beside
/// the request lines, so that the whole stream parses line by line.
/// Field names are stable: `time`, `level`, `label`, `message`, and the
/// metadata's own keys under `metadata`.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    private let label: String

    public init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let merged = metadata.merging(event.metadata ?? [:]) { _, new in new }
        var text = "{\"time\":\(LogWriter.json(LogWriter.timestamp())),\"type\":\"log\","
            + "\"level\":\(LogWriter.json(event.level.rawValue)),\"label\":\(LogWriter.json(label)),"
            + "\"message\":\(LogWriter.json(event.message.description))"
        if !merged.isEmpty {
            let fields = merged.sorted { $0.key < $1.key }.map { "\(LogWriter.json($0.key)):\(LogWriter.json("\($0.value)"))" }
            text += ",\"metadata\":{" + fields.joined(separator: ",") + "}"
        }
        LogWriter.write(text + "}\n")
    }
}
