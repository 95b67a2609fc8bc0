/// What a content-addressed read names: a blob or a manifest. Both are
/// content (DESIGN.md: one store, one fill, one responder); the kind only
/// says which registry path fetches it and whether a media type is kept.
public enum ContentKind: String, Sendable, Hashable {
    case blob
    case manifest

    /// The path segment of the registry API: `/v2/<name>/<segment>/<digest>`.
    public var pathSegment: String {
        switch self {
        case .blob: return "blobs"
        case .manifest: return "manifests"
        }
    }
}

/// The reference of `/v2/<name>/manifests/<reference>`.
public enum ManifestReference: Equatable, Sendable {
    case digest(Digest)
    case tag(String)

    /// The OCI distribution spec's tag grammar: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    static func isValidTag(_ tag: Substring) -> Bool {
        isValidTag(tag.utf8)
    }

    /// The same over a tag's UTF-8.
    static func isValidTag<Bytes: Collection<UInt8>>(_ tag: Bytes) -> Bool {
        guard let first = tag.first, tag.count <= 128 else { return false }
        func isWord(_ byte: UInt8) -> Bool {
            (byte >= 0x61 && byte <= 0x7a) || (byte >= 0x41 && byte <= 0x5a) || (byte >= 0x30 && byte <= 0x39)
                || byte == 0x5f
        }
        return isWord(first) && tag.dropFirst().allSatisfy { isWord($0) || $0 == 0x2e || $0 == 0x2d }
    }
}
