/// The bar `cache-proxy preload` and `cache-proxy verify` draw on a
/// terminal: `[=========>          ] 45%`.
public enum ProgressBar {
    public static func draw(_ fraction: Double, width: Int = 30) -> String {
        let fraction = min(1, max(0, fraction))
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "=", count: filled) + (filled < width ? ">" : "")
            + String(repeating: " ", count: max(0, width - filled - 1))
        return "[\(bar)] \(Int(fraction * 100))%"
    }
}
