internal import CURing
import NIOConcurrencyHelpers

/// Gives memory the process freed back to the kernel, between bursts.
///
/// glibc keeps what a thread frees in that thread's arena for the next
/// `malloc`: a fill's 256 KiB write batches on a cooperative thread, a
/// herd's buffers, 64 connections' pipelines on the event loops each leave
/// their arena's high-water mark resident, and the marks add up (7 MiB over
/// the shared harness's scenarios, though no two needed theirs at once).
/// `malloc_trim` returns the free pages of every arena (`MADV_DONTNEED`), so
/// the resident size follows what is in use.
///
/// Asked every `interval` by one task; it trims only when glibc's free
/// bytes grew by `threshold` since the last trim (or since the lowest count
/// seen after it): free bytes stay counted once their pages are returned,
/// so the count alone would trim the same fragments every time.
public final class FreedMemory: Sendable {
    public static let interval: Duration = .seconds(2)
    public static let threshold = 1 << 20

    /// Free bytes at the last trim, lowered when later checks see fewer
    /// (reused, so their pages are resident again).
    private let baseline = NIOLockedValueBox(0)

    public init() {}

    /// Returns the bytes glibc held free when it trimmed, or nil when not
    /// enough was freed since the last time (nothing done).
    @discardableResult
    public func returnIfGrown() -> Int? {
        let free = Int(mallinfo2().fordblks)
        let grown = baseline.withLockedValue { baseline -> Bool in
            if free < baseline { baseline = free }
            guard free - baseline >= Self.threshold else { return false }
            baseline = free
            return true
        }
        guard grown else { return nil }
        _ = malloc_trim(0)
        return free
    }
}
