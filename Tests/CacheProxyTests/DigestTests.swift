import XCTest
@testable import CacheProxy

final class DigestTests: XCTestCase {
    let hex64 = String(repeating: "ab", count: 32)

    func testParsesSHA256AndSHA512() throws {
        let d = try Digest(parsing: "sha256:\(hex64)")
        XCTAssertEqual(d.algorithm, .sha256)
        XCTAssertEqual(d.hex, hex64)
        XCTAssertEqual(d.description, "sha256:\(hex64)")
        let long = String(repeating: "0f", count: 64)
        XCTAssertEqual(try Digest(parsing: "sha512:\(long)").algorithm, .sha512)
    }

    func testRefusesUnsupportedAlgorithms() {
        XCTAssertThrowsError(try Digest(parsing: "md5:\(hex64)")) {
            XCTAssertEqual($0 as? Digest.ParseError, .unsupportedAlgorithm("md5"))
        }
        XCTAssertThrowsError(try Digest(parsing: "SHA256:\(hex64)"))
    }

    func testRefusesBadHex() {
        for bad in ["sha256:\(hex64.uppercased())", "sha256:\(hex64.dropLast())", "sha256:\(hex64)0",
                    "sha256:" + String(repeating: "g", count: 64), "sha256:../../../../etc/passwd", "sha256"] {
            XCTAssertThrowsError(try Digest(parsing: bad), bad)
        }
    }

    /// The parser reads bytes, not `Character`s: a non-ASCII byte anywhere is
    /// refused, and a combining mark cannot join the colon into one
    /// character and hide it.
    func testReadsDigestsAsBytes() {
        XCTAssertThrowsError(try Digest(parsing: "shä256:\(hex64)")) {
            XCTAssertEqual($0 as? Digest.ParseError, .unsupportedAlgorithm("shä256"))
        }
        XCTAssertThrowsError(try Digest(parsing: "sha256:\(hex64.dropLast())é")) {
            XCTAssertEqual($0 as? Digest.ParseError, .badEncoding)
        }
        XCTAssertThrowsError(try Digest(parsing: "sha256\u{301}:\(hex64)")) {
            XCTAssertEqual($0 as? Digest.ParseError, .unsupportedAlgorithm("sha256\u{301}"))
        }
        // The colon followed by a combining mark is one Character, but its byte is found.
        XCTAssertThrowsError(try Digest(parsing: "sha256:\u{301}\(hex64.dropFirst(2))")) {
            XCTAssertEqual($0 as? Digest.ParseError, .badEncoding)
        }
        XCTAssertEqual(try? Digest(parsing: Substring("x sha256:\(hex64)").dropFirst(2)).hex, hex64)
    }

    /// Equal digests are one key however they were made (parsed, or the
    /// empty blob's literal), and a digest differing in any one hex digit
    /// is another key that hashes apart.
    func testEqualDigestsAreOneKeyAndEveryDigitCounts() throws {
        let empty256 = try Digest(parsing: "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(Digest.empty(.sha256), empty256)
        XCTAssertEqual(Digest.empty(.sha256).hashValue, empty256.hashValue)
        let empty512 = try Digest(parsing: "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
            + "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e")
        XCTAssertEqual(Digest.empty(.sha512), empty512)
        XCTAssertEqual(Digest.empty(.sha512).hashValue, empty512.hashValue)
        let base = try Digest(parsing: "sha256:\(hex64)")
        var keys: Set<Digest> = [base]
        for position in 0..<64 {
            var hex = Array(hex64.utf8)
            hex[position] = UInt8(ascii: "0")
            let other = try Digest(parsing: "sha256:" + String(decoding: hex, as: UTF8.self))
            XCTAssertNotEqual(other, base, "digit \(position)")
            // The hasher is seeded per process: a clash here is 1 in 2^64.
            XCTAssertNotEqual(other.hashValue, base.hashValue, "digit \(position)")
            keys.insert(other)
        }
        XCTAssertEqual(keys.count, 65)
        XCTAssertTrue(keys.contains(try Digest(parsing: Substring("x sha256:\(hex64)").dropFirst(2))))
    }

    func testStorePathIsBuiltFromTheDigestOnly() throws {
        let folder = try makeTemporaryFolder("digest")
        let store = try makeStore(folder)
        let d = try Digest(parsing: "sha256:\(hex64)")
        XCTAssertEqual(store.path(for: d), "\(folder)/blobs/sha256/ab/\(hex64)")
    }
}

final class ByteRangeTests: XCTestCase {
    func testForms() {
        XCTAssertEqual(ByteRange(header: "bytes=0-99"), .from(start: 0, end: 99))
        XCTAssertEqual(ByteRange(header: "bytes=100-"), .from(start: 100, end: nil))
        XCTAssertEqual(ByteRange(header: "bytes=-20"), .suffix(length: 20))
        XCTAssertNil(ByteRange(header: "bytes=0-1,5-6"), "multi-range is served whole")
        XCTAssertNil(ByteRange(header: "items=0-1"))
        XCTAssertNil(ByteRange(header: "bytes=5-1"))
        XCTAssertNil(ByteRange(header: "bytes=-"))
        XCTAssertNil(ByteRange(header: "bytes=+1-2"))
    }

    func testResolve() {
        XCTAssertEqual(ByteRange.from(start: 0, end: 99).resolve(size: 1000), 0...99)
        XCTAssertEqual(ByteRange.from(start: 900, end: 5000).resolve(size: 1000), 900...999)
        XCTAssertEqual(ByteRange.from(start: 10, end: nil).resolve(size: 1000), 10...999)
        XCTAssertEqual(ByteRange.suffix(length: 10).resolve(size: 1000), 990...999)
        XCTAssertEqual(ByteRange.suffix(length: 5000).resolve(size: 1000), 0...999)
        XCTAssertNil(ByteRange.from(start: 1000, end: nil).resolve(size: 1000))
        XCTAssertNil(ByteRange.suffix(length: 0).resolve(size: 1000))
    }
}
