import Foundation
import Logging
import NIOConcurrencyHelpers
import ProxyMetrics

/// The on-disk cache: `<folder>/blobs/<algo>/<hex[0:2]>/<hex>` for complete,
/// verified blobs and `<folder>/tmp/` for fills in progress, on the same file
/// system so that `rename` is the atomic commit point. Nothing partial is ever
/// visible under `blobs/`.
///
/// The in-memory index (digest ─► size) is rebuilt by scanning at start; it
/// lets `HEAD` and the hit check answer without touching the disk.
public final class BlobStore: Sendable {
    public let folder: String
    let blobsFolder: String
    let tmpFolder: String
    private let index = NIOLockedValueBox<[Digest: Int64]>([:])
    private let tmpCounter = NIOLockedValueBox<UInt64>(0)
    private let metrics: ProxyMetrics
    private let logger: Logger
    private let lastOpenErrorLog = NIOLockedValueBox<ContinuousClock.Instant?>(nil)

    /// Creates the folders, deletes what an earlier run left in `tmp/` and
    /// indexes `blobs/`.
    public init(folder: String, metrics: ProxyMetrics, logger: Logger) throws {
        self.folder = folder
        self.blobsFolder = folder + "/blobs"
        self.tmpFolder = folder + "/tmp"
        self.metrics = metrics
        self.logger = logger
        let fm = FileManager.default
        try fm.createDirectory(atPath: blobsFolder, withIntermediateDirectories: true)
        removeTemporaryFiles()
        try fm.createDirectory(atPath: tmpFolder, withIntermediateDirectories: true)
        let found = Self.scan(blobsFolder: blobsFolder, logger: logger)
        index.withLockedValue { $0 = found }
        updateGauges()
        logger.info("cache indexed", metadata: ["folder": "\(folder)", "blobs": "\(found.count)"])
    }

    /// Walks `blobs/<algo>/<xx>/<hex>`; anything that is not a well-formed
    /// digest path in its right place is ignored (and never served).
    static func scan(blobsFolder: String, logger: Logger) -> [Digest: Int64] {
        let fm = FileManager.default
        var found: [Digest: Int64] = [:]
        for algorithm in Digest.Algorithm.allCases {
            let algoFolder = blobsFolder + "/" + algorithm.rawValue
            for prefix in (try? fm.contentsOfDirectory(atPath: algoFolder)) ?? [] {
                for name in (try? fm.contentsOfDirectory(atPath: algoFolder + "/" + prefix)) ?? [] {
                    guard let digest = try? Digest(parsing: "\(algorithm.rawValue):\(name)"),
                          name.hasPrefix(prefix), prefix.count == 2 else { continue }
                    var st = stat()
                    guard stat(algoFolder + "/" + prefix + "/" + name, &st) == 0,
                          (st.st_mode & S_IFMT) == S_IFREG else { continue }
                    found[digest] = Int64(st.st_size)
                }
            }
        }
        return found
    }

    public func path(for digest: Digest) -> String {
        let hex = digest.hex
        return "\(blobsFolder)/\(digest.algorithm.rawValue)/\(hex.prefix(2))/\(hex)"
    }

    /// Size of a complete cached blob, from the index alone.
    public func size(of digest: Digest) -> Int64? {
        index.withLockedValue { $0[digest] }
    }

    /// What opening a cached blob found.
    public enum Opened {
        case file(fd: CInt, size: Int64)
        /// Not cached (or deleted behind the index's back): a miss.
        case missing
        /// Cached, but it could not be opened now (out of descriptors or
        /// memory): the blob is still there and stays in the index.
        case unavailable
    }

    /// Opens a complete cached blob for reading. Running out of
    /// descriptors or memory (EMFILE, ENFILE, ENOMEM) passes, and the cache
    /// must not forget its own content over it: `.unavailable`, the blob
    /// stays. Any other failure means the file is gone or unusable (deleted
    /// by hand, replaced by a symlink, wrong owner, a bad sector): it is
    /// dropped from the index and fetched again.
    public func openCached(_ digest: Digest) -> Opened {
        guard size(of: digest) != nil else { return .missing }
        // O_NONBLOCK: a FIFO put where a blob was must not block the event
        // loop in open(); on a regular file it changes nothing.
        let fd = open(path(for: digest), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        var error = fd >= 0 ? 0 : errno
        if fd >= 0 {
            var st = stat()
            if fstat(fd, &st) != 0 {
                error = errno
            } else if (st.st_mode & S_IFMT) == S_IFREG {
                return .file(fd: fd, size: Int64(st.st_size))
            } else {
                error = EINVAL  // not a regular file: unusable, whatever errno says
            }
            close(fd)
        }
        if error == EMFILE || error == ENFILE || error == ENOMEM {
            openFailed(error)
            return .unavailable
        }
        if error != ENOENT {
            logger.warning("cached blob is unusable; fetching it again",
                           metadata: ["digest": "\(digest)", "error": "\(String(cString: strerror(error)))"])
        }
        forget(digest)
        return .missing
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
    public func makeTemporaryFile(for digest: Digest) throws -> (path: String, fd: CInt) {
        let n = tmpCounter.withLockedValue { $0 += 1; return $0 }
        let path = "\(tmpFolder)/\(digest.algorithm.rawValue)-\(digest.hex).\(getpid()).\(n)"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw StoreError.system("create \(path)", errno) }
        return (path, fd)
    }

    /// Moves a verified temporary file to its final name; the rename is the
    /// commit point.
    public func publish(temporaryPath: String, digest: Digest, size: Int64) throws {
        let final = path(for: digest)
        let parent = String(final[..<(final.lastIndex(of: "/") ?? final.endIndex)])
        try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        guard rename(temporaryPath, final) == 0 else { throw StoreError.system("rename to \(final)", errno) }
        index.withLockedValue { $0[digest] = size }
        updateGauges()
    }

    /// Deletes everything under `tmp/`: what an earlier run left (at start),
    /// or the unfinished fills of a process about to exit at once.
    public func removeTemporaryFiles() {
        let fm = FileManager.default
        for leftover in (try? fm.contentsOfDirectory(atPath: tmpFolder)) ?? [] {
            try? fm.removeItem(atPath: tmpFolder + "/" + leftover)
        }
    }

    public func discard(temporaryPath: String) {
        unlink(temporaryPath)
    }

    func forget(_ digest: Digest) {
        index.withLockedValue { _ = $0.removeValue(forKey: digest) }
        updateGauges()
    }

    private func updateGauges() {
        let (count, bytes) = index.withLockedValue { ($0.count, $0.values.reduce(0, +)) }
        metrics.cacheEntries.set(Double(count))
        metrics.cacheSizeBytes.set(Double(bytes))
    }
}

public enum StoreError: Error, CustomStringConvertible {
    case system(String, Int32)
    public var description: String {
        switch self {
        case .system(let what, let code): return "\(what): \(String(cString: strerror(code)))"
        }
    }
}
