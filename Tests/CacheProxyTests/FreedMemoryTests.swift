import IOURing
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Memory the process freed goes back to the kernel when the proxy asks
/// (every `FreedMemory.interval` while serving, when enough was freed), instead of staying
/// resident in glibc's arenas until the same thread allocates again.
final class FreedMemoryTests: XCTestCase {
    func testFreedHeapPagesLeaveTheResidentSet() throws {
        // 24 MiB in 1 KiB pieces: far below the mmap threshold, so they come
        // from the heap, and one piece allocated after them keeps glibc from
        // giving them back as the top of the heap when they are freed.
        var pieces: [UnsafeMutableRawPointer] = []
        pieces.reserveCapacity(24 * 1024)
        for _ in 0..<(24 * 1024) {
            guard let piece = malloc(1024) else { return XCTFail("malloc") }
            memset(piece, 1, 1024)
            pieces.append(piece)
        }
        guard let pin = malloc(1024) else { return XCTFail("malloc") }
        defer { free(pin) }
        let inUse = try residentAnonymous()
        for piece in pieces { free(piece) }
        let freed = try residentAnonymous()
        XCTAssertGreaterThan(freed, inUse - (8 << 20), "glibc keeps what was freed resident")

        let memory = FreedMemory()
        let held = try XCTUnwrap(memory.returnIfGrown(), "more than the threshold was freed")
        XCTAssertGreaterThanOrEqual(held, 20 << 20)
        XCTAssertLessThan(try residentAnonymous(), freed - (16 << 20), "returned to the kernel")
        XCTAssertNil(memory.returnIfGrown(), "nothing freed since: no second trim of the same pages")
    }

    private func residentAnonymous() throws -> Int {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let line = try XCTUnwrap(status.split(separator: "\n").first { $0.hasPrefix("RssAnon:") })
        let kib = try XCTUnwrap(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
        return kib * 1024
    }
}
