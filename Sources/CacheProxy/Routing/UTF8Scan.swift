/// Byte searches over a string's UTF-8 through its contiguous storage.
///
/// Every request's target is scanned several times (its query, its
/// digest's colon, the log line), and `String.UTF8View`'s generic
/// `firstIndex(of:)` walks it one checked `String.Index` at a time: on the
/// 4 KiB hit those walks were about a tenth of the proxy's own CPU
/// (benchmarks/RESULTS.md). Strings read from the network are native UTF-8,
/// so the scan runs over a plain buffer; a bridged or foreign string falls
/// back to the generic walk, with the same answer.
extension Substring {
    /// The index of the first `byte` in the UTF-8, or nil.
    func firstIndex(ofByte byte: UInt8) -> Index? {
        let offset = utf8.withContiguousStorageIfAvailable { $0.firstIndex(of: byte) }
        guard let offset else { return utf8.firstIndex(of: byte) }
        return offset.map { utf8.index(startIndex, offsetBy: $0) }
    }

    /// The index of the last `byte` in the UTF-8, or nil.
    func lastIndex(ofByte byte: UInt8) -> Index? {
        let offset = utf8.withContiguousStorageIfAvailable { $0.lastIndex(of: byte) }
        guard let offset else { return utf8.lastIndex(of: byte) }
        return offset.map { utf8.index(startIndex, offsetBy: $0) }
    }

    /// Whether every byte of the UTF-8 passes `test`.
    func allBytes(_ test: (UInt8) -> Bool) -> Bool {
        utf8.withContiguousStorageIfAvailable { $0.allSatisfy(test) } ?? utf8.allSatisfy(test)
    }

    /// Whether the UTF-8 is exactly `bytes` (byte equality: no Unicode
    /// equivalence, which a path has no business with).
    /// (`withUTF8Buffer`, not `utf8Start`: a one-character literal may be
    /// held as a scalar, which `utf8Start` traps on.)
    func hasBytes(_ bytes: StaticString) -> Bool {
        bytes.withUTF8Buffer { expected in
            utf8.withContiguousStorageIfAvailable { $0.elementsEqual(expected) } ?? utf8.elementsEqual(expected)
        }
    }

    /// Whether the UTF-8 starts with `bytes`.
    func hasPrefixBytes(_ bytes: StaticString) -> Bool {
        bytes.withUTF8Buffer { expected in
            utf8.withContiguousStorageIfAvailable { $0.starts(with: expected) } ?? utf8.starts(with: expected)
        }
    }
}

extension String {
    /// The index of the first `byte` in the UTF-8, or nil.
    func firstIndex(ofByte byte: UInt8) -> Index? { self[...].firstIndex(ofByte: byte) }

    /// Whether the UTF-8 holds `byte`.
    func containsByte(_ byte: UInt8) -> Bool { firstIndex(ofByte: byte) != nil }
}

extension UnsafeBufferPointer<UInt8> {
    /// Whether the bytes are exactly `bytes`.
    func hasBytes(_ bytes: StaticString) -> Bool {
        bytes.withUTF8Buffer { elementsEqual($0) }
    }

    /// Whether the bytes start with `bytes`.
    func hasPrefixBytes(_ bytes: StaticString) -> Bool {
        bytes.withUTF8Buffer { starts(with: $0) }
    }
}
