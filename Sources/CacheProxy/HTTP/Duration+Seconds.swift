extension Duration {
    /// The duration in seconds, for metrics, logs and summaries.
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
