/// Byte searches over a string's UTF-8 through its contiguous storage.
///
/// A request's target is scanned for a byte (its query, a digest's colon),
/// and `String.UTF8View`'s generic `firstIndex(of:)` walks it one checked
/// `String.Index` at a time: on the 4 KiB hit those walks were about a
/// tenth of the proxy's own CPU (benchmarks/RESULTS.md). Strings read from
/// the network are native UTF-8, so the scan runs over a plain buffer; a
/// bridged or foreign string falls back to the generic walk, with the same
/// answer. `RequestTarget.classify` borrows a target's bytes once instead
/// and uses the buffer helpers below.
extension Substring {
    /// The index of the first `byte` in the UTF-8, or nil.
    func firstIndex(ofByte byte: UInt8) -> Index? {
        let offset = utf8.withContiguousStorageIfAvailable { $0.firstIndex(of: byte) }
        guard let offset else { return utf8.firstIndex(of: byte) }
        return offset.map { utf8.index(startIndex, offsetBy: $0) }
    }
}

extension String {
    /// The index of the first `byte` in the UTF-8, or nil.
    func firstIndex(ofByte byte: UInt8) -> Index? { self[...].firstIndex(ofByte: byte) }

    /// Whether the UTF-8 holds `byte`.
    func containsByte(_ byte: UInt8) -> Bool { firstIndex(ofByte: byte) != nil }
}

extension UnsafeBufferPointer<UInt8> {
    /// Whether the bytes are exactly `bytes` (byte equality: no Unicode
    /// equivalence, which a path has no business with). (`withUTF8Buffer`,
    /// not `utf8Start`: a one-character literal may be held as a scalar,
    /// which `utf8Start` traps on.)
    func hasBytes(_ bytes: StaticString) -> Bool {
        bytes.withUTF8Buffer { elementsEqual($0) }
    }

    /// Whether the bytes start with `bytes`.
    func hasPrefixBytes(_ bytes: StaticString) -> Bool {
        bytes.withUTF8Buffer { starts(with: $0) }
    }
}
