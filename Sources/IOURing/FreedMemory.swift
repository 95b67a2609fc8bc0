internal import CURing
#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers

/// Gives memory the process freed back to the kernel, between bursts.
///
/// glibc keeps what a thread frees in that thread's arena for the next
/// `malloc`: a fill's upstream buffers on a cooperative thread, a
/// herd's buffers, 64 connections' pipelines on the event loops each leave
/// their arena's high-water mark resident, and the marks add up (7 MiB over
/// the shared harness's scenarios, though no two needed theirs at once).
/// `malloc_trim` returns the free pages of every arena (`MADV_DONTNEED`), so
/// the resident size follows what is in use.
///
/// Asked every `interval`; it trims only when the anonymous resident size
/// grew by `threshold` since the last trim (or since the lowest size seen
/// after it). Under a steady load the size is steady and nothing is done
/// (a trim there would only make the next requests fault their pages back
/// in); a second burst that reuses and frees the same memory grows it again
/// and is trimmed again. The check reads `/proc/self/statm` and takes no
/// allocator lock; `malloc_trim` does take each arena's lock while it walks
/// that arena, so it runs off the event loops and the cooperative pool.
public final class FreedMemory: Sendable {
    public static let interval: Duration = .seconds(2)
    public static let threshold = 1 << 20

    /// The anonymous resident size after the last trim, lowered when a
    /// later check sees less.
    private let baseline: NIOLockedValueBox<Int>

    public init() {
        baseline = NIOLockedValueBox(Self.residentAnonymous() ?? 0)
    }

    /// Trims when the anonymous resident size grew by `threshold` since the
    /// baseline. Returns the size before and after, or nil (nothing done).
    @discardableResult
    public func returnIfGrown() -> (before: Int, after: Int)? {
        guard let now = Self.residentAnonymous() else { return nil }
        let grown = baseline.withLockedValue { baseline -> Bool in
            if now < baseline { baseline = now }
            return now - baseline >= Self.threshold
        }
        guard grown else { return nil }
        Self.returnAll()
        let after = Self.residentAnonymous() ?? now
        baseline.withLockedValue { $0 = after }
        return (now, after)
    }

    /// Allocations of `size` bytes or more get pages of their own (`mmap`),
    /// returned to the kernel on `free` (unless an arena happens to hold a
    /// free chunk that fits: then from there, and the 2 s trim returns it);
    /// smaller ones come from the arenas.
    ///
    /// glibc starts at 128 KiB but raises the threshold to the size of each
    /// mapped block freed, so after a fill's first 1 MiB write buffers are
    /// freed the next fill's come from an arena, and every cooperative
    /// thread's arena keeps a fill's worth resident (+3 MB of peak RSS over
    /// a run of cold fills, `benchmarks/cold_ab.sh`). A fixed threshold
    /// also fixes the arenas' trim threshold at its 128 KiB default.
    public static func mapAllocations(from size: Int) {
        _ = mallopt(M_MMAP_THRESHOLD, CInt(size))
    }

    /// Bytes in blocks that have pages of their own (`mallinfo2().hblkhd`).
    public static func mappedBytes() -> Int {
        Int(mallinfo2().hblkhd)
    }

    /// Every arena's free pages to the kernel, now.
    public static func returnAll() {
        _ = malloc_trim(0)
    }

    /// Resident bytes not backed by a file (`/proc/self/statm`: resident
    /// less shared pages), or nil when it cannot be read.
    public static func residentAnonymous() -> Int? {
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var text = [UInt8](repeating: 0, count: 128)
        let count = text.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        let fields = text[..<count].split(separator: UInt8(ascii: " ")).prefix(3).map {
            $0.reduce(0) { number, digit in
                (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(digit) ? number * 10 + Int(digit - UInt8(ascii: "0")) : number
            }
        }
        guard fields.count == 3, fields[1] >= fields[2] else { return nil }
        return (fields[1] - fields[2]) * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
