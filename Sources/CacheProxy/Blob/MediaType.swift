import Foundation
import IOURing
#if canImport(Glibc)
import Glibc
#endif

/// A manifest's media type: what the upstream sent as its `Content-Type`,
/// kept on the cached file (`BlobStore.typeAttribute`) so that a hit answers
/// as the upstream did. Clients pick the manifest parser by it: an index
/// served as `application/octet-stream` is not an image to them.
struct MediaType: Sendable, Equatable {
    let value: String
    /// The type without parameters, lower-cased: what `Accept` is matched
    /// on. Made once: a tag pull matches it against the client's `Accept`
    /// and the tag table's entries each time.
    let essence: String

    /// Only a plain token (`type/subtype`, parameters allowed) of visible
    /// ASCII: the value is sent back as a header, and a tampered folder or
    /// a hostile upstream must not put a line break into it.
    ///
    /// Spaces and tabs around it are dropped by hand, not with Foundation's
    /// `trimmingCharacters`: this runs once per tag pull, and the
    /// character-set machinery cost ~5% of that path's CPU.
    init?(_ text: String) {
        let bytes = text.utf8
        let trimmed = Self.trimmed(bytes)
        guard !trimmed.isEmpty, trimmed.count <= 255, trimmed.contains(UInt8(ascii: "/")),
              trimmed.allSatisfy({ $0 >= 0x20 && $0 < 0x7f }) else { return nil }
        // The essence is what comes before any parameter, and it is the
        // part that must be `type/subtype` (`;/` is not a type).
        let type = Self.trimmed(trimmed.prefix { $0 != UInt8(ascii: ";") })
        guard type.contains(UInt8(ascii: "/")) else { return nil }
        value = trimmed.count == bytes.count ? text : String(Substring(trimmed))
        essence = String(decoding: type.map(HTTPToken.lowercased), as: UTF8.self)
    }

    private static func isBlank(_ byte: UInt8) -> Bool { byte == 0x20 || byte == 0x09 }

    /// An index (OCI) or manifest list (Docker): many platforms.
    var isIndex: Bool {
        essence.hasSuffix("image.index.v1+json") || essence.hasSuffix("manifest.list.v2+json")
    }

    /// Whether a client sending these `Accept` headers takes this type: no
    /// `Accept` at all, `*/*`, `type/*`, or the type itself. A client that
    /// names only other types (an old Docker asking for schema 1) must not
    /// get an index it cannot parse from the offline table.
    func isAccepted(by accept: [String]) -> Bool {
        verdict(of: accept, wildcards: true)
    }

    /// Whether these `Accept` headers name this type itself (no wildcard,
    /// not `q=0`): what a registry's negotiation counts. distribution
    /// serves an index, a list or an OCI manifest only to a client that
    /// names its type, and answers anyone else with another manifest (a
    /// list's platform manifest) or a 404, but it compares `If-None-Match`
    /// before it looks at `Accept`. So a tag's `HEAD` expects a manifest
    /// only of a type the client names (`TagLookup.expected`): then the 304
    /// means what a 200 would have said.
    func isNamed(by accept: [String]) -> Bool {
        verdict(of: accept, wildcards: false)
    }

    private func verdict(of accept: [String], wildcards: Bool) -> Bool {
        var verdict = AcceptVerdict(wildcards: wildcards)
        for field in accept {
            var field = field
            field.withUTF8 { verdict.read(UnsafeRawBufferPointer($0), for: self) }
        }
        return verdict.accepted
    }

    /// The same for one `Accept` field as the client's bytes (a pull by tag
    /// read from them, `TagLookup`): no `String` per range.
    func isNamed(byField field: UnsafeRawBufferPointer) -> Bool {
        var verdict = AcceptVerdict(wildcards: false)
        verdict.read(field, for: self)
        return verdict.accepted
    }

    /// `Accept` ranges read against one type, field after field: each
    /// range without its parameters; the type itself with `q=0` is a "not
    /// this", whatever a wildcard says.
    private struct AcceptVerdict {
        /// Whether `*/*` and `type/*` take the type (what a client takes),
        /// or only its own name does (what a registry serves it by).
        let wildcards: Bool
        private var named = false
        private var refused = false
        private var matched = false

        init(wildcards: Bool) { self.wildcards = wildcards }

        /// A client that names nothing takes anything, but names nothing.
        var accepted: Bool { (wildcards && !named) || (!refused && matched) }

        mutating func read(_ field: UnsafeRawBufferPointer, for type: MediaType) {
            // The essence's own bytes, not its `UTF8View`: compared range by
            // range through the generic walk, that was ~4,700 instructions a
            // pull by tag (`benchmarks/callgrind.sh`).
            var essence = type.essence
            essence.withUTF8 { read(field, essence: $0) }
        }

        private mutating func read(_ field: UnsafeRawBufferPointer, essence: UnsafeBufferPointer<UInt8>) {
            // Walked in place: this runs on every pull by tag, and split
            // arrays cost allocations there.
            MediaType.forEachPart(of: field[...], separatedBy: UInt8(ascii: ",")) { range in
                var name: Slice<UnsafeRawBufferPointer>?
                var zeroWeight = false
                MediaType.forEachPart(of: range, separatedBy: UInt8(ascii: ";")) { part in
                    if name == nil {
                        name = MediaType.trimmed(part)
                    } else if MediaType.isZeroWeight(MediaType.trimmed(part)) {
                        zeroWeight = true
                    }
                }
                guard let name, !name.isEmpty else { return }
                named = true
                let isSelf = HTTPToken.equalsLowercased(name, essence)
                if zeroWeight {
                    if isSelf { refused = true }
                } else if isSelf {
                    matched = true
                } else if !wildcards {
                    return
                } else if HTTPToken.equalsLowercased(name, "*/*".utf8) {
                    matched = true
                } else if name.count >= 2, name.last == UInt8(ascii: "*"),
                          let slash = essence.firstIndex(of: UInt8(ascii: "/")),
                          HTTPToken.equalsLowercased(name.dropLast(), essence[...slash]) {
                    matched = true  // `type/*`
                }
            }
        }
    }

    /// Calls `body` with each part of `bytes` between `separator`s, empty
    /// ones included.
    private static func forEachPart(of bytes: Slice<UnsafeRawBufferPointer>, separatedBy separator: UInt8,
                                    _ body: (Slice<UnsafeRawBufferPointer>) -> Void) {
        var start = bytes.startIndex
        while true {
            let end = bytes[start...].firstIndex(of: separator) ?? bytes.endIndex
            body(bytes[start..<end])
            guard end < bytes.endIndex else { return }
            start = end + 1
        }
    }

    /// `bytes` without the spaces and tabs around them (empty if that is all).
    private static func trimmed<Bytes: BidirectionalCollection<UInt8>>(_ bytes: Bytes) -> Bytes.SubSequence {
        guard let first = bytes.firstIndex(where: { !isBlank($0) }),
              let last = bytes.lastIndex(where: { !isBlank($0) }) else { return bytes[bytes.endIndex...] }
        return bytes[first...last]
    }

    /// `q=0`, `q=0.`, `q=0.000` (RFC 9110's qvalue of nothing).
    private static func isZeroWeight(_ parameter: Slice<UnsafeRawBufferPointer>) -> Bool {
        guard parameter.count >= 3, HTTPToken.lowercased(parameter[parameter.startIndex]) == UInt8(ascii: "q"),
              parameter[parameter.startIndex + 1] == UInt8(ascii: "=") else { return false }
        let weight = parameter.dropFirst(2)
        return weight.first == UInt8(ascii: "0")
            && (weight.count == 1 || (weight.dropFirst().first == UInt8(ascii: ".")
                && weight.dropFirst(2).allSatisfy { $0 == UInt8(ascii: "0") }))
    }

    /// The media type of the cached manifest open at `fd`: the one stored
    /// with it, else the body's own `mediaType` field (a folder copied
    /// without extended attributes), else what its shape says.
    static func ofCachedManifest(fd: CInt, size: Int64) -> MediaType? {
        // A stored type that names no JSON document (a registry or a CDN
        // that said `application/octet-stream`) is not believed over the
        // body's own.
        let stored = FileAttributes.get(BlobStore.typeAttribute, fd: fd).flatMap(MediaType.init)
        if let stored, stored.essence.hasSuffix("json") || stored.essence.hasSuffix("prettyjws") {
            return stored
        }
        guard let found = ofBody(fd: fd, size: size) else { return stored }
        // Kept on the file for the next hit (best effort: a read-only
        // folder, or one without user attributes, parses every time).
        _ = FileAttributes.set(BlobStore.typeAttribute, to: found.value, on: fd)
        return found
    }

    /// The manifest's own `mediaType`, else what its shape says.
    private static func ofBody(fd: CInt, size: Int64) -> MediaType? {
        guard size > 0, size <= 4 << 20 else { return nil }
        var data = Data(count: Int(size))
        let got = data.withUnsafeMutableBytes { pread(fd, $0.baseAddress, Int(size), 0) }
        guard got == size, let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            return nil
        }
        if let named = (object["mediaType"] as? String).flatMap(MediaType.init) { return named }
        if object["manifests"] != nil { return MediaType("application/vnd.oci.image.index.v1+json") }
        if object["config"] != nil, object["layers"] != nil {
            return MediaType("application/vnd.oci.image.manifest.v1+json")
        }
        return nil
    }

    /// What a manifest fill asks the upstream for when the client named
    /// nothing: every manifest type a current client parses.
    static let manifestAccept = [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ].joined(separator: ", ")
}
