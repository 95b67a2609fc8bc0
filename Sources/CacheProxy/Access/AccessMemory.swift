import Crypto
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The upstream's earlier answers, kept in the storage folder so that they
/// outlive the process (DESIGN.md, Offline memory): an edge node that
/// restarts during an outage still serves what the upstream allowed before.
///
/// `<folder>/offline/key` holds the HMAC key that credentials are hashed
/// with (32 random bytes, mode 0600, made once); `<folder>/offline/memory`
/// the grants and links, one a line. No credential is ever written, only
/// its keyed hash, and the key travels with the folder: a copied folder
/// (`tar`, `rsync`) serves on another machine.
///
/// Everything loaded is stale (a restart forgets what is fresh): while the
/// upstream answers, each (credential, repository) is asked again; while it
/// cannot be asked, `offline: serve` serves from it.
enum AccessMemory {
    struct Snapshot: Sendable, Equatable {
        var grants: [AccessGate.Grant] = []
        var links: [AccessGate.Link] = []
    }

    static let header = "cache-proxy offline memory 1"

    static func folder(_ storage: String) -> String { storage + "/offline" }

    /// The folder's key, made on first use. A key file that cannot be read
    /// or has the wrong size is replaced (what was hashed under it is then
    /// unusable, and is dropped with it: `load` returns nothing).
    static func key(storage: String, logger: Logger) throws -> (key: SymmetricKey, isNew: Bool) {
        let dir = folder(storage)
        if mkdir(dir, 0o700) != 0 && errno != EEXIST { throw StoreError.system("mkdir \(dir)", errno) }
        let path = dir + "/key"
        if let data = FileManager.default.contents(atPath: path), data.count == 32 {
            return (SymmetricKey(data: data), false)
        }
        if FileManager.default.fileExists(atPath: path) {
            logger.warning("offline memory key unusable; making a new one (earlier access answers are forgotten)",
                           metadata: ["path": "\(path)"])
        }
        let key = SymmetricKey(size: .bits256)
        try key.withUnsafeBytes { bytes in
            try write(Data(bytes), to: path, mode: 0o600)
        }
        return (key, true)
    }

    /// What the memory file holds; nothing when it is missing, and without
    /// the lines that do not parse (a file from a later version, damage).
    static func load(storage: String, capacity: Int) -> Snapshot {
        guard let text = try? String(contentsOfFile: folder(storage) + "/memory", encoding: .utf8) else {
            return Snapshot()
        }
        var snapshot = Snapshot()
        var lines = text.split(separator: "\n")[...]
        guard lines.popFirst() == Substring(header) else { return snapshot }
        for line in lines {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            switch (fields.first, fields.count) {
            case ("g", 5):
                guard snapshot.grants.count < capacity, let high = UInt64(fields[2], radix: 16),
                      let low = UInt64(fields[3], radix: 16) else { continue }
                snapshot.grants.append(AccessGate.Grant(
                    upstream: String(fields[1]), credential: AccessGate.CredentialHash(high: high, low: low),
                    repository: String(fields[4])))
            case ("l", 4):
                guard snapshot.links.count < capacity, let digest = try? Digest(parsing: fields[3]) else { continue }
                snapshot.links.append(AccessGate.Link(upstream: String(fields[1]), repository: String(fields[2]),
                                                      digest: digest))
            default:
                continue
            }
        }
        return snapshot
    }

    /// Writes the memory crash-safely: a new file, fsynced, renamed over the
    /// old one, and the folder fsynced, so a crash leaves the old memory or
    /// the new one, never a part.
    static func save(_ snapshot: Snapshot, storage: String) throws {
        var text = header + "\n"
        text.reserveCapacity(64 * (snapshot.grants.count + snapshot.links.count + 1))
        for grant in snapshot.grants {
            text += "g \(grant.upstream) \(String(grant.credential.high, radix: 16)) \(String(grant.credential.low, radix: 16)) \(grant.repository)\n"
        }
        for link in snapshot.links {
            text += "l \(link.upstream) \(link.repository) \(link.digest)\n"
        }
        try write(Data(text.utf8), to: folder(storage) + "/memory", mode: 0o600)
    }

    /// `data` to `path` through a temporary file and a rename.
    private static func write(_ data: Data, to path: String, mode: mode_t) throws {
        let temporary = "\(path).\(getpid()).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw StoreError.system("open \(temporary)", errno) }
        var failure: StoreError?
        data.withUnsafeBytes { bytes in
            var offset = 0
            while offset < bytes.count {
                let written = Glibc.write(fd, bytes.baseAddress.map { $0 + offset }, bytes.count - offset)
                if written < 0 {
                    if errno == EINTR { continue }
                    failure = .system("write \(temporary)", errno)
                    return
                }
                offset += written
            }
        }
        if failure == nil, fsync(fd) != 0 { failure = .system("fsync \(temporary)", errno) }
        close(fd)
        if failure == nil, rename(temporary, path) != 0 { failure = .system("rename \(temporary)", errno) }
        if let failure {
            unlink(temporary)
            throw failure
        }
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
        let dirFD = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dirFD >= 0 {
            _ = fsync(dirFD)
            close(dirFD)
        }
    }
}
