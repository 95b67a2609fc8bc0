import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `cache-proxy verify`: hashes every file under `blobs/` again and removes
/// those whose bytes are not their digest's. A blob is verified before it
/// is published, so this finds only what happened to it on disk since: a
/// power loss with `storage.fsync: false` (a file of the right size whose
/// blocks never reached the disk), a failing disk, a hand edit.
///
/// Safe beside a running server: a file is only ever removed (never
/// changed), and a server that finds a cached file gone forgets it and
/// fetches it again; a client already reading it keeps its descriptor.
public struct BlobVerifier: Sendable {
    public struct Damage: Sendable, Equatable {
        public let path: String
        public let problem: String
        /// The damaged file is gone (not with `--dry-run`, nor when the
        /// removal failed).
        public var removed = false
    }

    public struct Report: Sendable {
        public var files = 0
        public var bytes: Int64 = 0
        public var damaged: [Damage] = []
        /// Files that could not be read (permissions, I/O errors): not
        /// removed, since their bytes were never seen.
        public var unreadable: [Damage] = []
        /// Damaged files that could not be removed.
        public var unremoved = 0
    }

    public let folder: String
    public let remove: Bool

    /// The cached files (path, digest, size) and the folders that could
    /// not be listed.
    public typealias Listing = (found: [(path: String, digest: Digest, size: Int64)], unlisted: [Damage])

    public init(folder: String, remove: Bool) {
        (self.folder, self.remove) = (folder, remove)
    }

    /// Every cached file with its digest and size, in path order, and the
    /// folders that could not be listed (not silently skipped: a cache the
    /// caller may not read is not a clean one).
    public func files() -> Listing {
        var found: [(String, Digest, Int64)] = []
        var unlisted: [Damage] = []
        let fm = FileManager.default
        func list(_ path: String) -> [String] {
            do {
                return try fm.contentsOfDirectory(atPath: path).sorted()
            } catch {
                unlisted.append(Damage(path: path, problem: "cannot be listed (\(error.localizedDescription))"))
                return []
            }
        }
        if !BlobScan.isDirectory(folder + "/blobs") {
            unlisted.append(Damage(path: folder + "/blobs", problem: "is not a folder this process can read"))
        }
        for algorithm in Digest.Algorithm.allCases {
            let algoFolder = folder + "/blobs/" + algorithm.rawValue
            guard BlobScan.isDirectory(algoFolder) else { continue }
            for prefix in list(algoFolder) {
                guard BlobScan.isDirectory(algoFolder + "/" + prefix) else { continue }
                for name in list(algoFolder + "/" + prefix) {
                    let path = algoFolder + "/" + prefix + "/" + name
                    guard let digest = try? Digest(parsing: "\(algorithm.rawValue):\(name)"), name.hasPrefix(prefix)
                    else { continue }
                    var st = stat()
                    guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                    found.append((path, digest, Int64(st.st_size)))
                }
            }
        }
        return (found, unlisted)
    }

    /// Checks every file; `progress` is told of each file's bytes as they
    /// are read, and of the end of each file.
    public func run(_ listing: Listing? = nil,
                    progress: (_ bytes: Int64, _ fileDone: Bool) -> Void = { _, _ in }) -> Report {
        var report = Report()
        let (found, unlisted) = listing ?? files()
        report.unreadable = unlisted
        for file in found {
            report.files += 1
            report.bytes += file.size
            switch Self.hash(path: file.path, algorithm: file.digest.algorithm, progress: { progress($0, false) }) {
            case .failure(let code) where code == ENOENT:
                // Evicted (or removed) by a running server meanwhile.
                report.files -= 1
                report.bytes -= file.size
            case .failure(let code):
                report.unreadable.append(Damage(path: file.path, problem: String(cString: strerror(code))))
            case .success(let hex) where hex == file.digest.hex:
                break
            case .success:
                var damage = Damage(path: file.path, problem: "its bytes do not hash to \(file.digest)")
                if remove {
                    damage.removed = unlink(file.path) == 0
                    if !damage.removed {
                        damage = Damage(path: file.path,
                                        problem: damage.problem + "; NOT removed: \(String(cString: strerror(errno)))")
                        report.unremoved += 1
                    }
                }
                report.damaged.append(damage)
            }
            progress(0, true)
        }
        return report
    }

    enum Hashed {
        case success(String)
        case failure(Int32)
    }

    static func hash(path: String, algorithm: Digest.Algorithm, progress: (Int64) -> Void) -> Hashed {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return .failure(errno) }
        defer {
            // Read once, not again soon: leave the page cache to the
            // server's hot blobs.
            _ = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED))
            close(fd)
        }
        var hasher = DigestHasher(algorithm)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                return .failure(errno)
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { hasher.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            progress(Int64(n))
        }
        return .success(hasher.finalizeHex())
    }
}
