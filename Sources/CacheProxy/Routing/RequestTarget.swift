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
    ///
    /// All of it is read from the target's own UTF-8 in one borrow (a
    /// native string is contiguous; another is made so once): this runs on
    /// every request, hits included, and each `Substring` scan it once made
    /// paid a generic walk or a storage look-up of its own, about a sixth of
    /// a 4 KiB hit's instructions (`benchmarks/callgrind.sh`).
    public static func classify(method: String, uri: String) throws(Rejection) -> RequestTarget {
        var uri = uri
        return try uri.withUTF8 { classify(method: method, target: $0) }.get()
    }

    /// `classify` over the target's bytes. Paths are compared as bytes, not
    /// as `String`s: equal paths are equal bytes (no Unicode equivalence).
    private static func classify(method: String, target: UnsafeBufferPointer<UInt8>)
        -> Result<RequestTarget, Rejection> {
        let path = RequestURI.path(of: target)
        if path.hasBytes("/metrics") { return .success(.metrics) }
        if path.hasBytes("/healthz") { return .success(.healthz) }
        if path.hasBytes("/readyz") { return .success(.readyz) }
        if let found = findTraversal(path) { return .failure(found) }
        guard method == "GET" || method == "HEAD" else { return .success(.passThrough) }
        if path.hasBytes("/v2/") || path.hasBytes("/v2") { return .success(.ping) }
        guard path.hasPrefixBytes("/v2/") else { return .success(.passThrough) }
        // `/v2/<name>/blobs/uploads/...` is the push API, not a blob read.
        if let blobs = lastSegment("/blobs/", in: path) {
            let digestPart = UnsafeBufferPointer(rebasing: path[blobs.upperBound...])
            if !digestPart.hasBytes("uploads"), !digestPart.contains(UInt8(ascii: "/")) {
                return repositoryName(in: path, before: blobs).flatMap { name in
                    digest(digestPart).map { .blob(name: name, digest: $0) }
                }
            }
        }
        if let manifests = lastSegment("/manifests/", in: path) {
            let reference = UnsafeBufferPointer(rebasing: path[manifests.upperBound...])
            if reference.contains(UInt8(ascii: ":")) {
                return repositoryName(in: path, before: manifests).flatMap { name in
                    digest(reference).map { .manifest(name: name, reference: .digest($0)) }
                }
            }
            // Anything that is not a tag is the upstream's to refuse.
            guard ManifestReference.isValidTag(reference) else { return .success(.passThrough) }
            return repositoryName(in: path, before: manifests).map {
                .manifest(name: $0, reference: .tag(String(decoding: reference, as: UTF8.self)))
            }
        }
        return .success(.passThrough)
    }

    /// The repository name between `/v2/` and `segment`.
    private static func repositoryName(in path: UnsafeBufferPointer<UInt8>, before segment: Range<Int>)
        -> Result<String, Rejection> {
        // `/v2/blobs/...` has no name at all: its `/blobs/` starts inside
        // the `/v2/` prefix (a reversed range, once a trap; found by fuzzing).
        let nameStart = 4  // after `/v2/` (checked by the caller)
        guard segment.lowerBound > nameStart else { return .failure(.nameInvalid("invalid repository name")) }
        let name = path[nameStart..<segment.lowerBound]
        guard RepositoryName.isValid(name) else { return .failure(.nameInvalid("invalid repository name")) }
        return .success(String(decoding: name, as: UTF8.self))
    }

    /// The digest a blob's or a manifest's last segment names, or why not.
    private static func digest(_ bytes: UnsafeBufferPointer<UInt8>) -> Result<Digest, Rejection> {
        Digest.parse(bytes).mapError { .digestInvalid($0.description) }
    }

    /// The refusal of `.`/`..` segments and encoded dots, slashes and
    /// backslashes anywhere in the path, or nil. No registry path needs
    /// them, and refusing them here means no later stage has to reason about
    /// what an upstream (or a file system) would make of them.
    private static func findTraversal(_ bytes: UnsafeBufferPointer<UInt8>) -> Rejection? {
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
    static func lastSegment(_ marker: StaticString, in path: UnsafeBufferPointer<UInt8>) -> Range<Int>? {
        var end = path.endIndex
        while let slash = path[..<end].lastIndex(of: UInt8(ascii: "/")) {
            if UnsafeBufferPointer(rebasing: path[slash...]).hasPrefixBytes(marker) {
                return slash..<(slash + marker.utf8CodeUnitCount)
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

    /// The same over a target's bytes.
    static func path(of uri: UnsafeBufferPointer<UInt8>) -> UnsafeBufferPointer<UInt8> {
        UnsafeBufferPointer(rebasing: uri[..<(uri.firstIndex(of: UInt8(ascii: "?")) ?? uri.endIndex)])
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
        isValid(name.utf8)
    }

    /// The same over a name's UTF-8.
    static func isValid<Bytes: Collection<UInt8>>(_ name: Bytes) -> Bool {
        guard !name.isEmpty, name.count <= 255 else { return false }
        // One pass over the bytes, no allocation: this runs on every
        // request, hits included.
        var componentStart = true
        var previousWasAlnum = false
        // The separator run since the last alphanumeric: its first byte and length.
        var separator: UInt8 = 0
        var separatorLength = 0
        for byte in name {
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
