/// A single `Range: bytes=...` request, resolved against a blob's size.
///
/// Registry clients only ever ask for one range (containerd resumes a layer
/// with `bytes=N-`), so a multi-range header is treated like no header at all
/// and answered with the whole blob, which RFC 9110 allows.
public enum ByteRange: Equatable, Sendable {
    /// `bytes=a-b` or `bytes=a-`
    case from(start: Int64, end: Int64?)
    /// `bytes=-n`: the last n bytes
    case suffix(length: Int64)

    /// Parses the header value; `nil` means "ignore the header and send 200".
    public init?(header: String) {
        let value = header.trimmingSpaces()
        guard value.hasPrefix("bytes=") else { return nil }
        let spec = value.dropFirst("bytes=".count)
        guard !spec.contains(","), let dash = spec.firstIndex(of: "-") else { return nil }
        let first = spec[..<dash]
        let second = spec[spec.index(after: dash)...]
        if first.isEmpty {
            guard let length = Int64(digitsOnly: second) else { return nil }
            self = .suffix(length: length)
        } else {
            guard let start = Int64(digitsOnly: first) else { return nil }
            if second.isEmpty {
                self = .from(start: start, end: nil)
            } else {
                guard let end = Int64(digitsOnly: second), end >= start else { return nil }
                self = .from(start: start, end: end)
            }
        }
    }

    /// The inclusive byte interval to send for a blob of `size` bytes, or `nil`
    /// when the range cannot be satisfied (answer 416).
    public func resolve(size: Int64) -> ClosedRange<Int64>? {
        switch self {
        case .from(let start, let end):
            guard start < size else { return nil }
            return start...min(end ?? (size - 1), size - 1)
        case .suffix(let length):
            guard length > 0, size > 0 else { return nil }
            return max(0, size - length)...(size - 1)
        }
    }
}

extension Int64 {
    /// Like `Int64(_:)` but refuses signs and spaces, which a byte range never has.
    init?(digitsOnly text: Substring) {
        guard !text.isEmpty, text.utf8.count <= 18,
              text.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
              let value = Int64(text) else { return nil }
        self = value
    }
}

extension String {
    func trimmingSpaces() -> Substring {
        var view = Substring(self)
        while view.first == " " || view.first == "\t" { view = view.dropFirst() }
        while view.last == " " || view.last == "\t" { view = view.dropLast() }
        return view
    }
}
