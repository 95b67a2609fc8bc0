import Foundation
/// What a request asks for, decided from its method and path alone.
///
/// This is the one place that reads the raw request path: everything after it
/// works with a validated repository name and `Digest`.
public enum RequestTarget: Equatable, Sendable {
    case metrics
    case healthz
    case readyz
    /// `GET`/`HEAD /v2/<name>/blobs/<digest>`: served through the blob cache.
    case blob(name: String, digest: Digest)
    /// `GET`/`HEAD /v2/<name>/manifests/<digest|tag>`: by digest through
    /// the blob cache, by tag resolved by the upstream (`TagResolver`).
    case manifest(name: String, reference: ManifestReference)
    /// `GET`/`HEAD /v2/`: the ping every client sends first, remembered
    /// for when the upstream cannot be reached (`PingMemory`).
    case ping
    /// Anything else under the registry API: streamed to the upstream.
    case passThrough

    public enum Rejection: Error, Equatable, Sendable {
        case nameInvalid(String)
        case digestInvalid(String)
    }

    /// Classifies `uri` (path plus optional query).
    public static func classify(method: String, uri: String) throws(Rejection) -> RequestTarget {
        let path = RequestURI.path(of: uri)
        // Compared as bytes, not as `String`s: equal paths are equal bytes.
        if path.hasBytes("/metrics") { return .metrics }
        if path.hasBytes("/healthz") { return .healthz }
        if path.hasBytes("/readyz") { return .readyz }
        try rejectTraversal(path)
        guard method == "GET" || method == "HEAD" else { return .passThrough }
        if path.hasBytes("/v2/") || path.hasBytes("/v2") { return .ping }
        guard path.hasPrefixBytes("/v2/") else { return .passThrough }
        // `/v2/<name>/blobs/uploads/...` is the push API, not a blob read.
        if let blobs = lastSegment("/blobs/", in: path), !path[blobs.upperBound...].hasBytes("uploads"),
           path[blobs.upperBound...].firstIndex(ofByte: UInt8(ascii: "/")) == nil {
            let digestPart = path[blobs.upperBound...]
            let name = try repositoryName(in: path, before: blobs)
            do {
                return .blob(name: name, digest: try Digest(parsing: digestPart))
            } catch {
                throw .digestInvalid(error.description)
            }
        }
        if let manifests = lastSegment("/manifests/", in: path) {
            let reference = path[manifests.upperBound...]
            if reference.firstIndex(ofByte: UInt8(ascii: ":")) != nil {
                let name = try repositoryName(in: path, before: manifests)
                do {
                    return .manifest(name: name, reference: .digest(try Digest(parsing: reference)))
                } catch {
                    throw .digestInvalid(error.description)
                }
            }
            // Anything that is not a tag is the upstream's to refuse.
            guard ManifestReference.isValidTag(reference) else { return .passThrough }
            return .manifest(name: try repositoryName(in: path, before: manifests), reference: .tag(String(reference)))
        }
        return .passThrough
    }

    /// The repository name between `/v2/` and `segment`.
    private static func repositoryName(in path: Substring, before segment: Range<Substring.Index>) throws(Rejection)
        -> String {
        // `/v2/blobs/...` has no name at all: its `/blobs/` starts inside
        // the `/v2/` prefix (a reversed range, once a trap; found by fuzzing).
        let nameStart = path.utf8.index(path.startIndex, offsetBy: 4)  // after `/v2/` (checked by the caller)
        guard segment.lowerBound > nameStart else { throw .nameInvalid("invalid repository name") }
        let name = path[nameStart..<segment.lowerBound]
        guard RepositoryName.isValid(name) else {
            throw .nameInvalid("invalid repository name")
        }
        return String(name)
    }

    /// Refuses `.`/`..` segments and encoded dots, slashes and backslashes
    /// anywhere in the path. No registry path needs them, and refusing them
    /// here means no later stage has to reason about what an upstream (or a
    /// file system) would make of them.
    static func rejectTraversal(_ path: Substring) throws(Rejection) {
        // One pass over the bytes, without copying them: this runs on every
        // request, hits included.
        let found = path.utf8.withContiguousStorageIfAvailable(findTraversal) ?? findTraversal(Array(path.utf8))
        if let found { throw found }
    }

    private static func findTraversal<Bytes: RandomAccessCollection>(_ bytes: Bytes) -> Rejection?
    where Bytes.Element == UInt8, Bytes.Index == Int {
        var segmentStart = bytes.startIndex
        var index = bytes.startIndex
        while index <= bytes.endIndex {
            if index == bytes.endIndex || bytes[index] == UInt8(ascii: "/") {
                let length = index - segmentStart
                if (length == 1 || length == 2), bytes[segmentStart..<index].allSatisfy({ $0 == UInt8(ascii: ".") }) {
                    return .nameInvalid("path traversal is not allowed")
                }
                segmentStart = index + 1
                index += 1
                continue
            }
            switch bytes[index] {
            case UInt8(ascii: "\\"):
                return .nameInvalid("encoded path separators are not allowed")
            case UInt8(ascii: "%") where index + 2 < bytes.endIndex:
                let high = bytes[index + 1], low = bytes[index + 2] | 0x20  // ASCII lower case
                if (high == UInt8(ascii: "2") && (low == UInt8(ascii: "e") || low == UInt8(ascii: "f")))
                    || (high == UInt8(ascii: "5") && low == UInt8(ascii: "c"))
                    || (high == UInt8(ascii: "0") && bytes[index + 2] == UInt8(ascii: "0")) {
                    return .nameInvalid("encoded path separators are not allowed")
                }
            default:
                break
            }
            index += 1
        }
        return nil
    }

    /// The range of the last `marker` (`/blobs/`, `/manifests/`) in `path`.
    static func lastSegment(_ marker: String, in path: Substring) -> Range<Substring.Index>? {
        let marker = marker.utf8
        var end = path.endIndex
        while let slash = path[..<end].lastIndex(ofByte: UInt8(ascii: "/")) {
            let start = slash
            if path[start...].utf8.starts(with: marker) {
                return start..<path.utf8.index(start, offsetBy: marker.count)
            }
            end = slash
        }
        return nil
    }
}

/// Splitting of a request target into path and query.
public enum RequestURI {
    public static func path(of uri: String) -> Substring {
        if let q = uri.firstIndex(ofByte: UInt8(ascii: "?")) { return uri[..<q] }
        return Substring(uri)
    }

    /// The percent-decoded value of the first `key=value` pair with that key
    /// (containerd sends `ns=127.0.0.1%3A5000`).
    public static func queryValue(_ key: String, in uri: String) -> Substring? {
        guard let q = uri.firstIndex(ofByte: UInt8(ascii: "?")) else { return nil }
        for pair in uri[uri.index(after: q)...].split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            if parts.count == 2, parts[0] == key { return String(parts[1]).removingPercentEncoding.map { Substring($0) } }
        }
        return nil
    }
}

/// The OCI distribution spec's repository name grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
public enum RepositoryName {
    public static func isValid(_ name: Substring) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 255 else { return false }
        // One pass over the bytes, no allocation: this runs on every
        // request, hits included.
        var componentStart = true
        var previousWasAlnum = false
        // The separator run since the last alphanumeric: its first byte and length.
        var separator: UInt8 = 0
        var separatorLength = 0
        for byte in name.utf8 {
            if (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x30 && byte <= 0x39) {
                if separatorLength > 0 {
                    guard isSeparator(separator, separatorLength) else { return false }
                    separatorLength = 0
                }
                previousWasAlnum = true
                componentStart = false
            } else if byte == 0x2f {  // `/` ends a component, which must end alphanumeric
                guard previousWasAlnum, separatorLength == 0 else { return false }
                previousWasAlnum = false
                componentStart = true
            } else if byte == 0x2e || byte == 0x5f || byte == 0x2d {
                guard !componentStart else { return false }
                if separatorLength > 0, byte != separator { return false }  // `._`, `-_`: mixed
                separator = byte
                separatorLength += 1
                previousWasAlnum = false
            } else {
                return false
            }
        }
        return previousWasAlnum
    }

    /// `.`, `_`, `__` or one or more `-` may stand between two alphanumeric runs.
    private static func isSeparator(_ byte: UInt8, _ length: Int) -> Bool {
        switch byte {
        case 0x2e: return length == 1
        case 0x5f: return length <= 2
        default: return true  // `-`, any number
        }
    }
}
