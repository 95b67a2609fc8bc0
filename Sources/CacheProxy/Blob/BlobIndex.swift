/// What the cache holds, in memory: each complete blob's size, when it was
/// last used, and how many responses are reading it now. Not thread-safe:
/// `BlobStore` keeps it behind its lock.
///
/// Eviction is least recently used, chosen by sorting at the moment it is
/// needed: eviction runs only when the cache crosses its high watermark and
/// then goes down to the low one, so the sort is paid once per many
/// publishes, and a hit pays one timestamp write (in `retain` for a file,
/// `use` for a blob served from memory; a HEAD does not count as a use).
struct BlobIndex {
    struct Entry: Equatable {
        var size: Int64
        /// Nanoseconds since the epoch of the last use (after a restart, the
        /// later of the file's atime and mtime).
        var lastAccess: UInt64
        /// Responses reading the file now; such a blob is never evicted.
        var readers: Int = 0
    }

    private(set) var entries: [Digest: Entry] = [:]
    private(set) var totalBytes: Int64 = 0
    /// The last stamp given: stamps only grow, so two uses within the
    /// coarse clock's tick are still ordered.
    private var lastStamp: UInt64 = 0

    private mutating func stamp(_ now: UInt64) -> UInt64 {
        lastStamp = max(now, lastStamp + 1)
        return lastStamp
    }

    var count: Int { entries.count }

    /// A blob published now.
    mutating func insert(_ digest: Digest, size: Int64, now: UInt64) {
        put(digest, size: size, lastAccess: stamp(now))
    }

    /// A blob found by the start-up scan, with its file's time as it is:
    /// stamping would reorder the scan's blobs by the order a dictionary
    /// lists them in.
    mutating func insertScanned(_ digest: Digest, size: Int64, lastAccess: UInt64) {
        put(digest, size: size, lastAccess: lastAccess)
        lastStamp = max(lastStamp, lastAccess)
    }

    private mutating func put(_ digest: Digest, size: Int64, lastAccess: UInt64) {
        if let old = entries[digest] { totalBytes -= old.size }
        entries[digest] = Entry(size: size, lastAccess: lastAccess, readers: entries[digest]?.readers ?? 0)
        totalBytes += size
    }

    @discardableResult
    mutating func remove(_ digest: Digest) -> Entry? {
        guard let gone = entries.removeValue(forKey: digest) else { return nil }
        totalBytes -= gone.size
        return gone
    }

    func size(of digest: Digest) -> Int64? { entries[digest]?.size }

    /// The size, marking the blob used now.
    mutating func use(_ digest: Digest, now: UInt64) -> Int64? {
        // Through the index: one hash of the digest, and no allocation (an
        // optional chain's `entries[digest]?.lastAccess = …` made one per hit).
        guard let index = entries.index(forKey: digest) else { return nil }
        entries.values[index].lastAccess = stamp(now)
        return entries.values[index].size
    }

    /// Counts a reader in and marks the blob used; its size as published,
    /// nil when it is not in the index.
    mutating func retain(_ digest: Digest, now: UInt64) -> Int64? {
        guard let index = entries.index(forKey: digest) else { return nil }
        entries.values[index].readers += 1
        entries.values[index].lastAccess = stamp(now)
        return entries.values[index].size
    }

    mutating func release(_ digest: Digest) {
        if let index = entries.index(forKey: digest), entries.values[index].readers > 0 {
            entries.values[index].readers -= 1
        }
    }

    /// The blobs nobody reads, unsorted: eviction's candidates. The caller
    /// takes them under its lock and sorts them (`byLastUse`) outside it,
    /// away from the hit path. (Copying `entries` instead would make the
    /// next hit's write copy the whole dictionary, under the lock.)
    func idle() -> [(digest: Digest, lastAccess: UInt64)] {
        entries.compactMap { $0.value.readers == 0 ? ($0.key, $0.value.lastAccess) : nil }
    }

    static func byLastUse(_ candidates: [(digest: Digest, lastAccess: UInt64)]) -> [(digest: Digest, lastAccess: UInt64)] {
        candidates.sorted { $0.lastAccess < $1.lastAccess }
    }

    /// Removes a candidate if it is still as it was chosen: not read since,
    /// nobody reading it. Returns its size, nil if it stays.
    mutating func evict(_ digest: Digest, chosenAt lastAccess: UInt64) -> Int64? {
        guard let entry = entries[digest], entry.readers == 0, entry.lastAccess == lastAccess else { return nil }
        remove(digest)
        return entry.size
    }
}
