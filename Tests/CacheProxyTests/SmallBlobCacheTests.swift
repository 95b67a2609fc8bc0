import NIOCore
import XCTest
@testable import CacheProxy

final class SmallBlobCacheTests: XCTestCase {
    func digest(_ n: Int) throws -> Digest {
        try Digest(parsing: "sha256:" + String(repeating: String(format: "%02x", n), count: 32))
    }

    func testKeepsWithinItsBudgetOldestFirst() throws {
        let cache = SmallBlobCache(maxBlobSize: 100, capacity: 250)
        for n in 0..<3 { cache.put(try digest(n), ByteBuffer(repeating: UInt8(n), count: 100)) }
        XCTAssertNil(cache.get(try digest(0)), "the oldest went to make room")
        XCTAssertEqual(cache.get(try digest(1))?.bytes.readableBytes, 100)
        XCTAssertEqual(cache.get(try digest(2)).map { Array($0.bytes.readableBytesView) }, Array(repeating: 2, count: 100))
        XCTAssertEqual(cache.get(try digest(2))?.headers.first(name: "content-length"), "100")
        XCTAssertEqual(cache.get(try digest(2))?.headers.first(name: "docker-content-digest"), try digest(2).description)
        cache.put(try digest(9), ByteBuffer(repeating: 9, count: 101))
        XCTAssertNil(cache.get(try digest(9)), "larger than maxBlobSize is never kept")
        cache.remove(try digest(1))
        XCTAssertNil(cache.get(try digest(1)))
    }
}
