import Foundation
import Logging
import NIOConcurrencyHelpers
import ProxyMetrics

/// The on-disk cache: `<folder>/blobs/<algo>/<hex[0:2]>/<hex>` for complete,
/// verified blobs and `<folder>/tmp/` for fills in progress, on the same file
/// system so that `rename` is the atomic commit point. Nothing partial is ever
/// visible under `blobs/`.
///
/// The in-memory index (digest ─► size, last use, readers) is rebuilt by
/// scanning at start; it lets `HEAD` and the hit check answer without
/// touching the disk, and chooses what to evict when `storage.max_size` is
/// set. All disk changes go through the `BlobWriter` (io_uring or the
/// thread pool); the scan and the hit path's `open` are the exceptions.
public final class BlobStore: Sendable {
    public let folder: String
    let blobsFolder: String
    let tmpFolder: String
    let writer: any BlobWriter
    /// Bytes of small blobs, kept in memory; forgets with the index.
    let smallBlobs: SmallBlobCache
    private let limits: ProxyConfig.Storage
    private let index = NIOLockedValueBox(BlobIndex())
    private let tmpCounter = NIOLockedValueBox<UInt64>(0)
    private struct Evictions {
        var task: Task<Void, Never>?
        var stopped = false
    }
    private let evictions = NIOLockedValueBox(Evictions())
    private let metrics: ProxyMetrics
    private let logger: Logger
    private let lastOpenErrorLog = NIOLockedValueBox<ContinuousClock.Instant?>(nil)

    /// The extended attribute that records a blob's size when it is
    /// published, so the start-up scan can tell a file cut short (a crash
    /// before the data reached the disk) from a complete one.
    static let sizeAttribute = "user.cacheproxy.size"
    /// A manifest's media type, as the upstream named it (`Content-Type`).
    static let typeAttribute = "user.cacheproxy.type"

    /// Holds `<folder>/.lock` (flock) for the store's life: one process per
    /// cache folder. Two would delete each other's fills in `tmp/` at start
    /// and keep indexes that do not match the disk.
    private let lockFD: CInt

    /// Takes the folder's lock, creates the folders, deletes what an earlier
    /// run left in `tmp/` and indexes `blobs/`.
    public init(config: ProxyConfig.Storage, writer: any BlobWriter, metrics: ProxyMetrics, logger: Logger) throws {
        self.folder = config.folder
        self.blobsFolder = config.folder + "/blobs"
        self.tmpFolder = config.folder + "/tmp"
        self.limits = config
        self.writer = writer
        self.smallBlobs = SmallBlobCache()
        self.metrics = metrics
        self.logger = logger
        let fm = FileManager.default
        try fm.createDirectory(atPath: blobsFolder, withIntermediateDirectories: true)
        lockFD = try Self.lock(folder: config.folder)
        removeTemporaryFiles()
        try fm.createDirectory(atPath: tmpFolder, withIntermediateDirectories: true)
        let started = ContinuousClock.now
        let scan = BlobScan.run(blobsFolder: blobsFolder, logger: logger)
        index.withLockedValue { index in
            for (digest, entry) in scan.found {
                index.insertScanned(digest, size: entry.size, lastAccess: entry.lastAccess)
            }
        }
        updateGauges()
        metrics.cacheMaxSizeBytes.set(Double(limits.maxSize ?? 0))
        logger.info("cache indexed", metadata: [
            "folder": "\(folder)", "blobs": "\(scan.found.count)", "removed": "\(scan.removed)",
            "seconds": "\(started.duration(to: .now))",
        ])
        evictIfNeeded()
    }

    private static func lock(folder: String) throws -> CInt {
        let fd = open(folder + "/.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StoreError.system("open \(folder)/.lock", errno) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let error = errno
            close(fd)
            if error == EWOULDBLOCK { throw StoreError.folderInUse(folder) }
            throw StoreError.system("lock \(folder)/.lock", error)
        }
        return fd
    }

    /// Releases the folder for another process (at the end of a run).
    public func releaseFolder() {
        _ = Glibc.close(lockFD)
    }

    public func path(for digest: Digest) -> String {
        Self.path(for: digest, blobsFolder: blobsFolder)
    }

    /// Where a cached blob lives under a cache folder's `blobs/` (also for
    /// tools that read a folder without a store: `preload`).
    static func path(for digest: Digest, blobsFolder: String) -> String {
        let hex = digest.hex
        return "\(blobsFolder)/\(digest.algorithm.rawValue)/\(hex.prefix(2))/\(hex)"
    }

    /// Size of a complete cached blob, from the index alone.
    public func size(of digest: Digest) -> Int64? {
        index.withLockedValue { $0.size(of: digest) }
    }

    /// A cached manifest's media type (`MediaType.ofCachedManifest`).
    func mediaType(of digest: Digest) -> MediaType? {
        let fd = open(path(for: digest), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return MediaType.ofCachedManifest(fd: fd, size: Int64(st.st_size))
    }

    /// Size of a complete cached blob, marking it used (for eviction): for
    /// answers that open no file (blobs served from memory).
    func use(_ digest: Digest) -> Int64? {
        let now = Self.now()
        return index.withLockedValue { $0.use(digest, now: now) }
    }

    /// What opening a cached blob found.
    public enum Opened {
        /// Owned by the caller, who calls `release` after closing it.
        case file(fd: CInt, size: Int64)
        /// Not cached (or deleted behind the index's back): a miss.
        case missing
        /// Cached, but it could not be opened now (out of descriptors or
        /// memory): the blob is still there and stays in the index.
        case unavailable
    }

    /// Opens a complete cached blob for reading, and keeps it from eviction
    /// until `release`. Running out of descriptors or memory (EMFILE,
    /// ENFILE, ENOMEM) passes, and the cache must not forget its own content
    /// over it: `.unavailable`, the blob stays. Any other failure means the
    /// file is gone or unusable (deleted by hand, replaced by a symlink,
    /// wrong owner, a bad sector): it is dropped from the index and fetched
    /// again.
    public func openCached(_ digest: Digest) -> Opened {
        let now = Self.now()
        guard let published = index.withLockedValue({ $0.retain(digest, now: now) }) else { return .missing }
        // O_NONBLOCK: a FIFO put where a blob was must not block the event
        // loop in open(); on a regular file it changes nothing.
        let fd = open(path(for: digest), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        var error = fd >= 0 ? 0 : errno
        var problem: String?
        if fd >= 0 {
            var st = stat()
            if fstat(fd, &st) != 0 {
                error = errno
            } else if (st.st_mode & S_IFMT) != S_IFREG {
                error = EINVAL  // not a regular file: unusable, whatever errno says
            } else if Int64(st.st_size) != published {
                // Truncated or appended to behind the cache's back (another
                // process, a restore, a file system repair): its length
                // would go out as the answer's `Content-Length`, and a large
                // blob is sent without being hashed again. A short layer
                // with a matching length is exactly what must never be
                // served: it is dropped and fetched again.
                problem = "size \(st.st_size), published as \(published)"
            } else {
                return .file(fd: fd, size: published)
            }
            close(fd)
        }
        release(digest)
        if error == EMFILE || error == ENFILE || error == ENOMEM {
            openFailed(error)
            return .unavailable
        }
        if let problem {
            discardDamaged(digest, problem: problem)
            return .missing
        }
        if error != ENOENT {
            logger.warning("cached blob is unusable; fetching it again",
                           metadata: ["digest": "\(digest)", "error": "\(String(cString: strerror(error)))"])
        }
        forget(digest)
        return .missing
    }

    /// A response is done with a file `openCached` gave it.
    func release(_ digest: Digest) {
        index.withLockedValue { $0.release(digest) }
    }

    /// Counts every open that failed for lack of descriptors or memory and
    /// logs at most one a second: under fd pressure every request fails the
    /// same way.
    func openFailed(_ error: Int32) {
        let reason = error == EMFILE ? "emfile" : error == ENFILE ? "enfile" : "enomem"
        metrics.fileOpenErrors[reason]?.increment()
        let now = ContinuousClock.now
        let log = lastOpenErrorLog.withLockedValue { last -> Bool in
            guard last.map({ now - $0 >= .seconds(1) }) ?? true else { return false }
            last = now
            return true
        }
        if log {
            logger.error("cannot open cached blobs; answering 503", metadata: ["error": "\(String(cString: strerror(error)))"])
        }
    }

    /// A new, empty temporary file for a fill. Its name carries a counter so
    /// that a fill that failed and a new one for the same digest never meet.
    func makeTemporaryFile(for digest: Digest) async throws -> (path: String, fd: CInt) {
        let n = tmpCounter.withLockedValue { $0 += 1; return $0 }
        let path = "\(tmpFolder)/\(digest.algorithm.rawValue)-\(digest.hex).\(getpid()).\(n)"
        return (path, try await writer.create(path))
    }

    /// Whether a verified blob of `size` bytes is kept: one larger than
    /// what eviction leaves room for (the low watermark) is served to its
    /// clients and then dropped, rather than emptying the cache of
    /// everything else to make room for it.
    func keeps(size: Int64) -> Bool {
        guard let max = limits.maxSize else { return true }
        return size <= Int64(Double(max) * limits.lowWatermark)
    }

    /// Makes a verified temporary file a cache entry: records its size on
    /// it, fsyncs it (when configured), renames it to its final name (the
    /// commit point) and fsyncs the directory so the rename is durable too.
    func publish(temporary: (path: String, fd: CInt), digest: Digest, size: Int64,
                 mediaType: String? = nil) async throws {
        let final = path(for: digest)
        let parent = String(final[..<(final.lastIndex(of: "/") ?? final.endIndex)])
        do {
            try await writer.setAttribute(Self.sizeAttribute, to: String(size), on: temporary.fd)
            if let mediaType = mediaType.flatMap(MediaType.init) {
                try await writer.setAttribute(Self.typeAttribute, to: mediaType.value, on: temporary.fd)
            }
        } catch StoreError.system(_, let code) where code == EOPNOTSUPP {
            // A file system without user attributes: the scan then checks
            // what it can without one (see `BlobScan`), and a manifest's
            // media type is read from its body (`mediaType(of:)`).
        }
        if limits.fsync { try await writer.sync(temporary.fd) }
        // The prefix folder exists but for the first blob of its 256: try
        // the rename, and create the folder only when it is missing (its
        // own entry must then be made durable too).
        var created = false
        do {
            try await writer.rename(temporary.path, to: final)
        } catch StoreError.system(_, let code) where code == ENOENT {
            try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
            created = true
            try await writer.rename(temporary.path, to: final)
        }
        // From the rename on, the blob is complete under its name: it is
        // indexed whatever the directory fsync says, or the cache would
        // hold a file it does not count and fetch it again and again.
        index.withLockedValue { $0.insert(digest, size: size, now: Self.now()) }
        updateGauges()
        evictIfNeeded()
        if limits.fsync {
            do {
                try await writer.syncDirectory(parent)
                if created { try await writer.syncDirectory(String(parent[..<(parent.lastIndex(of: "/") ?? parent.endIndex)])) }
            } catch {
                logger.warning("a published blob's directory could not be synced; a power loss may lose the blob (never corrupt it)",
                               metadata: ["digest": "\(digest)", "error": "\(error)"])
            }
        }
    }

    /// Starts an eviction round when the cache holds more than the high
    /// watermark; one round at a time, and a round checks again when it
    /// ends (a publish during it may have crossed the mark anew).
    func evictIfNeeded() {
        guard let max = limits.maxSize else { return }
        let high = Int64(Double(max) * limits.highWatermark)
        let low = Int64(Double(max) * limits.lowWatermark)
        guard index.withLockedValue({ $0.totalBytes }) > high else { return }
        evictions.withLockedValue { state in
            guard state.task == nil, !state.stopped else { return }
            state.task = Task {
                while self.index.withLockedValue({ $0.totalBytes }) > high, !Task.isCancelled {
                    guard await self.evict(toReach: low) > 0 else { break }
                }
                self.evictions.withLockedValue { $0.task = nil }
            }
        }
    }

    /// Removes least recently used blobs nobody reads until the cache holds
    /// at most `target` bytes; returns how many went. Each blob leaves the
    /// index and the memory cache together, just before its file goes, so
    /// no new reader can find it half-gone, and a fill that fetches it again
    /// meanwhile cannot have its fresh file deleted by a late unlink (the
    /// window is one unlink, not a whole round). A reader that opened it
    /// earlier keeps its descriptor.
    @discardableResult
    func evict(toReach target: Int64) async -> Int {
        let candidates = BlobIndex.byLastUse(index.withLockedValue { $0.idle() })
        var (count, bytes): (Int, Int64) = (0, 0)
        for candidate in candidates {
            // Shutdown cancels a round: what is left waits for the next start.
            guard !Task.isCancelled else { break }
            enum Step { case done, skip, evicted(Int64) }
            let step = index.withLockedValue { index -> Step in
                guard index.totalBytes > target else { return .done }
                return index.evict(candidate.digest, chosenAt: candidate.lastAccess).map(Step.evicted) ?? .skip
            }
            guard case .evicted(let size) = step else {
                if case .done = step { break }
                continue  // read since it was chosen, or gone
            }
            smallBlobs.remove(candidate.digest)
            do {
                try await writer.unlink(path(for: candidate.digest))
            } catch {
                logger.warning("could not delete an evicted blob", metadata: ["digest": "\(candidate.digest)", "error": "\(error)"])
            }
            metrics.evictions.increment()
            updateGauges()
            (count, bytes) = (count + 1, bytes + size)
        }
        if count > 0 {
            logger.info("evicted least recently used blobs", metadata: ["blobs": "\(count)", "bytes": "\(bytes)"])
        }
        return count
    }

    /// Stops an eviction round in progress and waits for the blob it is
    /// deleting (shutdown: before the storage backend stops). A long round
    /// (after `max_size` was lowered) must not hold the exit.
    public func stopEvictions() async {
        let task = evictions.withLockedValue { state -> Task<Void, Never>? in
            state.stopped = true
            return state.task
        }
        task?.cancel()
        await task?.value
    }

    /// Deletes everything under `tmp/`: what an earlier run left (at start),
    /// or the unfinished fills of a process about to exit at once.
    public func removeTemporaryFiles() {
        let fm = FileManager.default
        for leftover in (try? fm.contentsOfDirectory(atPath: tmpFolder)) ?? [] {
            try? fm.removeItem(atPath: tmpFolder + "/" + leftover)
        }
    }

    func discard(temporaryPath: String) async {
        try? await writer.unlink(temporaryPath)
    }

    /// A cached file whose bytes are not its digest's: removed, so the next
    /// request fetches it again.
    func discardDamaged(_ digest: Digest, problem: String = "digest mismatch") {
        logger.warning("removing a damaged cached blob", metadata: ["digest": "\(digest)", "problem": "\(problem)"])
        unlink(path(for: digest))
        forget(digest)
    }

    func forget(_ digest: Digest) {
        index.withLockedValue { _ = $0.remove(digest) }
        smallBlobs.remove(digest)
        updateGauges()
    }

    private func updateGauges() {
        let (count, bytes) = index.withLockedValue { ($0.count, $0.totalBytes) }
        metrics.cacheEntries.set(Double(count))
        metrics.cacheSizeBytes.set(Double(bytes))
    }

    /// Wall-clock nanoseconds, from the coarse clock: a last-use time is
    /// compared with file atimes after a restart, and needs no precision.
    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

public enum StoreError: Error, CustomStringConvertible {
    case system(String, Int32)
    case folderInUse(String)

    public var description: String {
        switch self {
        case .system(let what, let code): return "\(what): \(String(cString: strerror(code)))"
        case .folderInUse(let folder):
            return "storage.folder \(folder) is in use by another cache-proxy process (it holds \(folder)/.lock)"
        }
    }

    /// The errno, for metrics labels.
    var code: Int32 {
        switch self {
        case .system(_, let code): return code
        case .folderInUse: return EWOULDBLOCK
        }
    }
}
