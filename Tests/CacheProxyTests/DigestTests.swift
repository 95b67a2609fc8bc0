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
