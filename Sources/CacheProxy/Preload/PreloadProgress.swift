import Foundation
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// What `cache-proxy preload` shows while it works. On a terminal, a bar
/// per image (bytes and blobs), redrawn in place; otherwise (a CI log, a
/// pipe) one line per image when it is done, and nothing that only makes
/// sense on a terminal. A summary ends both.
public final class PreloadProgress: Sendable {
    struct Line {
        let image: String
        var blobs = 0
        var blobsDone = 0
        var bytes: Int64 = 0
        var bytesDone: Int64 = 0
        var resolved = false
        var result: String?
    }

    private struct State {
        var lines: [Line] = []
        /// Lines drawn last time (on a terminal), to move back over.
        var drawn = 0
        var lastDraw: ContinuousClock.Instant?
    }

    private let state = NIOLockedValueBox(State())
    public let isTerminal: Bool
    private let write: @Sendable (String) -> Void

    /// Draws on standard output: bars when it is a terminal.
    public init() {
        self.isTerminal = isatty(STDOUT_FILENO) == 1
        self.write = { text in
            var text = text
            text.withUTF8 { LogWriter.write(bytes: UnsafeRawBufferPointer($0), to: STDOUT_FILENO) }
        }
    }

    func begin(_ image: String) -> Int {
        let index = state.withLockedValue { state -> Int in
            state.lines.append(Line(image: image))
            return state.lines.count - 1
        }
        redraw(force: true)
        return index
    }

    func resolved(_ line: Int, blobs: Int, bytes: Int64) {
        state.withLockedValue { state in
            state.lines[line].blobs = blobs
            state.lines[line].bytes = bytes
            state.lines[line].resolved = true
        }
        redraw(force: true)
    }

    func advanced(_ line: Int, bytes: Int64, blobDone: Bool) {
        state.withLockedValue { state in
            state.lines[line].bytesDone += bytes
            if blobDone { state.lines[line].blobsDone += 1 }
        }
        redraw(force: blobDone)
    }

    func end(_ line: Int, _ outcome: Preloader.Outcome) {
        let text = Self.result(outcome)
        state.withLockedValue { $0.lines[line].result = text }
        if isTerminal {
            redraw(force: true)
        } else {
            write(text + "\n")
        }
    }

    /// The closing summary; names every image that failed.
    public func summary(_ outcomes: [Preloader.Outcome], seconds: Double) {
        let failed = outcomes.filter { $0.failure != nil }
        let fetched = outcomes.reduce(0) { $0 + $1.blobsFetched }
        let cached = outcomes.reduce(0) { $0 + $1.blobsCached }
        let bytes = outcomes.reduce(Int64(0)) { $0 + $1.bytesFetched }
        var text = "preloaded \(outcomes.count - failed.count) of \(outcomes.count) images: \(fetched) blobs fetched, "
            + "\(cached) already cached, \(Self.size(bytes)) in \(String(format: "%.1f", seconds)) s\n"
        if !failed.isEmpty {
            text += "failed: " + failed.map(\.image).joined(separator: ", ") + "\n"
        }
        write(text)
    }

    static func result(_ outcome: Preloader.Outcome) -> String {
        if let failure = outcome.failure { return "FAILED \(outcome.image): \(failure)" }
        return "ok \(outcome.image): \(outcome.blobsFetched + outcome.blobsCached) blobs "
            + "(\(outcome.blobsFetched) fetched, \(outcome.blobsCached) already cached), "
            + "\(size(outcome.bytesFetched)), \(String(format: "%.1f", outcome.seconds)) s"
    }

    static func size(_ bytes: Int64) -> String {
        let units = ["B", "KB", "MB", "GB", "TB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1000, unit < units.count - 1 {
            value /= 1000
            unit += 1
        }
        return unit == 0 ? "\(bytes) B" : String(format: "%.1f %@", value, units[unit])
    }

    /// A line of the display: the image, a bar, blobs and bytes.
    static func render(_ line: Line, width: Int = 30) -> String {
        if let result = line.result { return result }
        guard line.resolved else { return "\(line.image)  resolving…" }
        let fraction = line.bytes > 0 ? Double(line.bytesDone) / Double(line.bytes) : 0
        return "\(line.image)  \(ProgressBar.draw(fraction, width: width))  \(line.blobsDone)/\(line.blobs) blobs  "
            + "\(size(line.bytesDone))/\(size(line.bytes))"
    }

    /// On a terminal: moves up over the lines drawn last time and draws
    /// them all again, at most ten times a second unless `force`.
    private func redraw(force: Bool) {
        guard isTerminal else { return }
        let text: String? = state.withLockedValue { state in
            let now = ContinuousClock.now
            if !force, let last = state.lastDraw, last.duration(to: now) < .milliseconds(100) { return nil }
            state.lastDraw = now
            var text = state.drawn > 0 ? "\u{1B}[\(state.drawn)F" : ""
            for line in state.lines { text += "\u{1B}[2K" + Self.render(line) + "\n" }
            state.drawn = state.lines.count
            return text
        }
        if let text { write(text) }
    }
}
