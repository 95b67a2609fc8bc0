import Foundation
import IOURing
import Logging

/// The start-up scan of `blobs/`: rebuilds the index (size, last use) and
/// removes what must never be served.
///
/// A blob is published by rename only after its digest matched, so under
/// `blobs/` a file is complete unless the machine lost power before the data
/// reached the disk (possible with `storage.fsync: false`: the rename can be
/// durable while the data is not, leaving a short or empty file under the
/// final name). The size the blob had when published is stored on the file
/// (`user.cacheproxy.size`); a file whose size differs is deleted here. A
/// file system without user attributes gets the one check that needs none:
/// an empty file is only kept under the digest of the empty blob.
///
/// What the scan cannot see: a file of the right size whose blocks hold
/// zeros or stale data after a power loss. Only `fsync: true` (the default)
/// rules that out.
enum BlobScan {
    struct Found {
        var size: Int64
        var lastAccess: UInt64
    }

    static func run(blobsFolder: String, logger: Logger) -> (found: [Digest: Found], removed: Int) {
        let fm = FileManager.default
        var found: [Digest: Found] = [:]
        var removed = 0
        for algorithm in Digest.Algorithm.allCases {
            let algoFolder = blobsFolder + "/" + algorithm.rawValue
            // Real folders only: a symlinked one would lead outside the
            // storage folder, where nothing is ever served from.
            guard isDirectory(algoFolder) else { continue }
            for prefix in (try? fm.contentsOfDirectory(atPath: algoFolder)) ?? [] {
                guard isDirectory(algoFolder + "/" + prefix) else { continue }
                for name in (try? fm.contentsOfDirectory(atPath: algoFolder + "/" + prefix)) ?? [] {
                    let path = algoFolder + "/" + prefix + "/" + name
                    // Anything that is not a well-formed digest path in its
                    // right place is not ours: left alone, never served.
                    guard let digest = try? Digest(parsing: "\(algorithm.rawValue):\(name)"),
                          name.hasPrefix(prefix), prefix.count == 2 else { continue }
                    var st = stat()
                    guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                    if let problem = check(path: path, digest: digest, size: Int64(st.st_size)) {
                        logger.warning("removing a damaged cached blob", metadata: ["digest": "\(digest)", "problem": "\(problem)"])
                        unlink(path)
                        removed += 1
                        continue
                    }
                    found[digest] = Found(size: Int64(st.st_size),
                                          lastAccess: max(nanoseconds(st.st_atim), nanoseconds(st.st_mtim)))
                }
            }
        }
        return (found, removed)
    }

    /// A directory itself, not a symlink to one.
    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    static func nanoseconds(_ time: timespec) -> UInt64 {
        UInt64(max(0, time.tv_sec)) &* 1_000_000_000 &+ UInt64(max(0, time.tv_nsec))
    }

    /// Why the file at `path` must not be served, or nil.
    static func check(path: String, digest: Digest, size: Int64) -> String? {
        if let text = FileAttributes.get(BlobStore.sizeAttribute, of: path) {
            let recorded = Int64(text)
            guard recorded == size else { return "size \(size), published as \(recorded.map(String.init) ?? "?")" }
            return nil
        }
        if size == 0 && digest != Digest.empty(digest.algorithm) { return "empty file" }
        return nil
    }
}
