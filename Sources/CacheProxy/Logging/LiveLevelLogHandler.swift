import Logging

/// Wraps a log handler so that its level is the live one (`LogLevelSetting`):
/// a reload that changes `log_level` changes it for every logger at once,
/// including those made before the reload.
public struct LiveLevelLogHandler: LogHandler {
    private var inner: any LogHandler
    private let setting: LogLevelSetting

    public init(wrapping inner: any LogHandler, level setting: LogLevelSetting) {
        self.inner = inner
        self.setting = setting
    }

    public var logLevel: Logger.Level {
        get { setting.value }
        set { _ = newValue }  // the configuration decides, not a logger's copy
    }

    public var metadata: Logger.Metadata {
        get { inner.metadata }
        set { inner.metadata = newValue }
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { inner[metadataKey: key] }
        set { inner[metadataKey: key] = newValue }
    }

    public func log(event: LogEvent) {
        inner.log(event: event)
    }
}
