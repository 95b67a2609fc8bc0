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
/// the grants, links, tags and ping answers, one a line. No credential is ever written, only
/// its keyed hash, and the key travels with the folder: a copied folder
/// (`tar`, `rsync`) serves on another machine.
///
/// Everything loaded is stale (a restart forgets what is fresh): while the
/// upstream answers, each (credential, repository) is asked again; while it
/// cannot be asked, `offline: serve` serves from it.
///
/// Each upstream's lines count only while the upstream is configured as
/// when they were written (`fingerprint`): pointing a `host` at another
/// registry, or removing the proxy's account, drops what its answers
/// allowed.
enum AccessMemory {
    /// A key file that exists but cannot be read: the memory is neither
    /// loaded nor written for this run (a new key would orphan it).
    struct KeyUnreadable: Error, CustomStringConvertible {
        let path: String
        let code: Int32
        var description: String { "\(path): \(String(cString: strerror(code)))" }
    }

    /// The largest memory file read: 2 × 65,536 lines of at most ~400
    /// bytes fit well inside; anything larger is not this proxy's.
    static let maxFileSize = 64 << 20
    struct Snapshot: Sendable, Equatable {
        var grants: [AccessGate.Grant] = []
        var links: [AccessGate.Link] = []
        /// Each tag's last digests (`TagTable`).
        var tags: [TagTable.Row] = []
        /// Each upstream's last `/v2/` answers (`PingMemory`).
        var pings: [PingMemory.Row] = []
    }

    static let header = "cache-proxy offline memory 1"

    static func folder(_ storage: String) -> String { storage + "/offline" }

    /// The folder's key, made on first use. A key file that cannot be read
    /// or has the wrong size is replaced (what was hashed under it is then
    /// unusable, and is dropped with it: `load` returns nothing).
    static func key(storage: String, logger: Logger) throws -> (key: SymmetricKey, isNew: Bool) {
        let dir = folder(storage)
        if mkdir(dir, 0o700) != 0 && errno != EEXIST { throw StoreError.system("mkdir \(dir)", errno) }
        removeTemporaryFiles(in: dir)
        let path = dir + "/key"
        switch read(path, limit: 64) {
        case .success(let data) where data.count == 32:
            return (SymmetricKey(data: data), false)
        case .success:
            logger.warning("offline memory key has the wrong size; making a new one (earlier access answers are forgotten)",
                           metadata: ["path": "\(path)"])
        case .failure(let code) where code == ENOENT:
            break
        case .failure(let code):
            throw KeyUnreadable(path: path, code: code)
        }
        let key = SymmetricKey(size: .bits256)
        try key.withUnsafeBytes { bytes in
            try write(Data(bytes), to: path, mode: 0o600)
        }
        return (key, true)
    }

    /// An upstream's configuration as far as its answers are concerned:
    /// where it is, whether credentials are checked, and whose account
    /// anonymous clients read as. No secret goes in.
    static func fingerprint(_ upstream: ProxyConfig.Upstream) -> String {
        let text = "\(upstream.origin)|\(upstream.accessCheck.rawValue)|\(upstream.credentials?.username ?? "")"
        var hasher = DigestHasher(.sha256)
        Array(text.utf8).withUnsafeBytes { hasher.update($0) }
        return String(hasher.finalizeHex().prefix(32))  // 128 bits
    }

    /// What the memory file holds for the upstreams configured now;
    /// nothing when it is missing or not a regular file of a sane size, and
    /// without the lines that do not parse (a file from a later version,
    /// damage) or that belong to an upstream configured otherwise.
    static func load(storage: String, capacity: Int, upstreams: [ProxyConfig.Upstream]) -> Snapshot {
        guard case .success(let data) = read(folder(storage) + "/memory", limit: maxFileSize),
              let text = String(data: data, encoding: .utf8) else {
            return Snapshot()
        }
        var snapshot = Snapshot()
        var tagRows: [TagTable.Key: [TagTable.Entry]] = [:]
        var tagOrder: [TagTable.Key] = []
        var pings: [String: PingMemory.Row] = [:]
        var lines = text.split(separator: "\n")[...]
        guard lines.popFirst() == Substring(header) else { return snapshot }
        let current = Dictionary(upstreams.map { ($0.host, fingerprint($0)) }, uniquingKeysWith: { first, _ in first })
        var valid = Set<Substring>()
        for line in lines where line.hasPrefix("u ") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            if fields.count == 3, let now = current[String(fields[1])], now == fields[2] { valid.insert(fields[1]) }
        }
        for line in lines {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count >= 2, valid.contains(fields[1]) else { continue }
            switch (fields.first, fields.count) {
            case ("g", 5):
                guard snapshot.grants.count < capacity, RepositoryName.isValid(fields[4]),
                      let high = UInt64(fields[2], radix: 16), let low = UInt64(fields[3], radix: 16) else { continue }
                snapshot.grants.append(AccessGate.Grant(
                    upstream: String(fields[1]), credential: AccessGate.CredentialHash(high: high, low: low),
                    repository: String(fields[4])))
            case ("l", 4), ("m", 4):
                // `l`: a blob's link, `m`: a manifest's.
                guard snapshot.links.count < capacity, RepositoryName.isValid(fields[2]),
                      let digest = try? Digest(parsing: fields[3]) else { continue }
                snapshot.links.append(AccessGate.Link(upstream: String(fields[1]), repository: String(fields[2]),
                                                      digest: digest, kind: fields[0] == "m" ? .manifest : .blob))
            case ("t", 6...):
                // `t <upstream> <repo> <tag> <digest> <media type>`, most
                // recent first; the media type may hold spaces.
                let parts = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: false)
                guard parts.count == 6, tagRows.count < capacity, RepositoryName.isValid(parts[2]),
                      ManifestReference.isValidTag(parts[3]), let digest = try? Digest(parsing: parts[4]),
                      let mediaType = MediaType(String(parts[5])) else { continue }
                let key = TagTable.Key(upstream: String(parts[1]), repository: String(parts[2]), tag: String(parts[3]))
                if tagRows[key] == nil { tagOrder.append(key) }
                tagRows[key, default: []].append(TagTable.Entry(digest: digest, mediaType: mediaType))
            case ("p", 3...):
                // `p <upstream> 200` or `p <upstream> 401 <challenge>`.
                let parts = line.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false)
                var row = pings[String(parts[1])] ?? PingMemory.Row(upstream: String(parts[1]))
                if parts[2] == "200", parts.count == 3 {
                    row.open = true
                } else if parts[2] == "401", parts.count == 4, PingMemory.isValidChallenge(String(parts[3])) {
                    row.challenge = String(parts[3])
                } else {
                    continue
                }
                pings[row.upstream] = row
            default:
                continue
            }
        }
        snapshot.tags = tagOrder.map { TagTable.Row(key: $0, entries: tagRows[$0] ?? []) }
        snapshot.pings = Array(pings.values)
        return snapshot
    }

    /// Writes the memory crash-safely: a new file, fsynced, renamed over the
    /// old one, and the folder fsynced, so a crash leaves the old memory or
    /// the new one, never a part.
    static func save(_ snapshot: Snapshot, storage: String, upstreams: [ProxyConfig.Upstream]) throws {
        var text = header + "\n"
        text.reserveCapacity(64 * (snapshot.grants.count + snapshot.links.count + upstreams.count + 1))
        // The file must stay loadable (`maxFileSize`): past that, lines
        // are left out, the pings and the upstreams first kept, then the
        // grants and links, then the tags (a forgotten tag costs an offline
        // pull by tag, never a wrong answer).
        var size = text.utf8.count
        func add(_ line: String) -> Bool {
            guard size + line.utf8.count < maxFileSize else { return false }
            size += line.utf8.count
            text += line
            return true
        }
        for upstream in upstreams {
            _ = add("u \(upstream.host) \(fingerprint(upstream))\n")
        }
        for row in snapshot.pings {
            if row.open { _ = add("p \(row.upstream) 200\n") }
            if let challenge = row.challenge { _ = add("p \(row.upstream) 401 \(challenge)\n") }
        }
        grants: for grant in snapshot.grants {
            let line = "g \(grant.upstream) \(String(grant.credential.high, radix: 16)) \(String(grant.credential.low, radix: 16)) \(grant.repository)\n"
            guard add(line) else { break grants }
        }
        links: for link in snapshot.links {
            guard add("\(link.kind == .manifest ? "m" : "l") \(link.upstream) \(link.repository) \(link.digest)\n") else {
                break links
            }
        }
        tags: for row in snapshot.tags {
            for entry in row.entries {
                let line = "t \(row.key.upstream) \(row.key.repository) \(row.key.tag) \(entry.digest) \(entry.mediaType.value)\n"
                guard add(line) else { break tags }
            }
        }
        try write(Data(text.utf8), to: folder(storage) + "/memory", mode: 0o600)
    }

    /// A regular file's bytes, at most `limit` of them; the errno otherwise
    /// (EFBIG when larger, EINVAL when not a regular file: a FIFO or a
    /// device must not block or flood the start).
    private enum Read {
        case success(Data)
        case failure(Int32)
    }

    private static func read(_ path: String, limit: Int) -> Read {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)
        guard fd >= 0 else { return .failure(errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { return .failure(errno) }
        guard info.st_mode & S_IFMT == S_IFREG else { return .failure(EINVAL) }
        guard info.st_size <= limit else { return .failure(EFBIG) }
        var data = Data(count: Int(info.st_size))
        let count = data.count
        let got = data.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, 0) }
        guard got >= 0 else { return .failure(errno) }
        return .success(data.prefix(got))
    }

    /// Temporary files of a write a crash interrupted.
    private static func removeTemporaryFiles(in dir: String) {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where name.hasSuffix(".tmp") {
            unlink(dir + "/" + name)
        }
    }

    /// `data` to `path` through a temporary file and a rename. Callers
    /// write one at a time (`ProxyServer` saves in one task).
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
