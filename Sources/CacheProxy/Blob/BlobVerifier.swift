import Crypto
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
    }

    public struct Report: Sendable {
        public var files = 0
        public var bytes: Int64 = 0
        public var damaged: [Damage] = []
        /// Files that could not be read (permissions, I/O errors): not
        /// removed, since their bytes were never seen.
        public var unreadable: [Damage] = []
    }

    public let folder: String
    public let remove: Bool

    public init(folder: String, remove: Bool) {
        (self.folder, self.remove) = (folder, remove)
    }

    /// Every cached file with its digest and size, in path order.
    public func files() -> [(path: String, digest: Digest, size: Int64)] {
        var found: [(String, Digest, Int64)] = []
        let fm = FileManager.default
        for algorithm in Digest.Algorithm.allCases {
            let algoFolder = folder + "/blobs/" + algorithm.rawValue
            guard BlobScan.isDirectory(algoFolder) else { continue }
            for prefix in ((try? fm.contentsOfDirectory(atPath: algoFolder)) ?? []).sorted() {
                guard BlobScan.isDirectory(algoFolder + "/" + prefix) else { continue }
                for name in ((try? fm.contentsOfDirectory(atPath: algoFolder + "/" + prefix)) ?? []).sorted() {
                    let path = algoFolder + "/" + prefix + "/" + name
                    guard let digest = try? Digest(parsing: "\(algorithm.rawValue):\(name)"), name.hasPrefix(prefix)
                    else { continue }
                    var st = stat()
                    guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
                    found.append((path, digest, Int64(st.st_size)))
                }
            }
        }
        return found
    }

    /// Checks every file; `progress` is told of each file's bytes as they
    /// are read, and of the end of each file.
    public func run(progress: (_ bytes: Int64, _ fileDone: Bool) -> Void = { _, _ in }) -> Report {
        var report = Report()
        for file in files() {
            report.files += 1
            report.bytes += file.size
            switch Self.hash(path: file.path, algorithm: file.digest.algorithm, progress: { progress($0, false) }) {
            case .failure(let code):
                report.unreadable.append(Damage(path: file.path, problem: String(cString: strerror(code))))
            case .success(let hex) where hex == file.digest.hex:
                break
            case .success:
                report.damaged.append(Damage(path: file.path, problem: "its bytes do not hash to \(file.digest)"))
                if remove { unlink(file.path) }
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
        defer { close(fd) }
        var sha256 = SHA256()
        var sha512 = SHA512()
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                return .failure(errno)
            }
            if n == 0 { break }
            buffer.withUnsafeBytes { bytes in
                let chunk = UnsafeRawBufferPointer(rebasing: bytes[0..<n])
                switch algorithm {
                case .sha256: sha256.update(bufferPointer: chunk)
                case .sha512: sha512.update(bufferPointer: chunk)
                }
            }
            progress(Int64(n))
        }
        let digest: [UInt8] = algorithm == .sha256 ? Array(sha256.finalize()) : Array(sha512.finalize())
        return .success(digest.map { String(format: "%02x", $0) }.joined())
    }
}
