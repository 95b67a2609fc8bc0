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
}
