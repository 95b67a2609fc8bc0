internal import CURing

/// What the page cache holds of a file: whether a `sendfile` of a range
/// would be served from memory or would wait for the disk.
///
/// `sendfile` on an event loop is only as fast as its slowest page: one
/// page not in memory and the loop (every connection on it) waits for the
/// disk. Asking first costs one syscall per region (`cachestat`, Linux 6.5;
/// `mmap` + `mincore` before), so a warm hit keeps its zero-copy path and
/// only a cold region is read on the thread pool (nginx's `aio threads`).
public enum PageCache {
    /// True only when every page of the range is cached now. An answer of
    /// "cannot tell" counts as not resident: the thread pool is the safe side.
    public static func isResident(fd: Int32, offset: Int64, length: Int64) -> Bool {
        guard offset >= 0, length >= 0 else { return false }
        return cacheproxy_resident(fd, UInt64(offset), UInt64(length)) == 1
    }

    /// Brings the range into the page cache and waits until it is there,
    /// without copying it anywhere (`MADV_POPULATE_READ`, Linux 5.14): a
    /// blocking call, for a thread pool. A region filled so can then go by
    /// `sendfile` from an event loop, zero-copy, where reading it on the
    /// pool and writing it from memory copies every byte twice. False when
    /// it could not (an older kernel, the file cut short): the caller reads
    /// the range itself.
    public static func populate(fd: Int32, offset: Int64, length: Int64) -> Bool {
        guard offset >= 0, length >= 0 else { return false }
        return cacheproxy_populate(fd, UInt64(offset), UInt64(length)) == 0
    }
}
