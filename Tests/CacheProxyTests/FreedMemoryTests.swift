import IOURing
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Memory the process freed goes back to the kernel when the proxy asks
/// (every `FreedMemory.interval` while serving, when enough was freed), instead of staying
/// resident in glibc's arenas until the same thread allocates again.
final class FreedMemoryTests: XCTestCase {
    func testFreedHeapPagesLeaveTheResidentSetAfterEachBurst() throws {
        let memory = FreedMemory()
        // 24 MiB in 1 KiB pieces: far below the mmap threshold, so they come
        // from the heap, and one piece allocated after them keeps glibc from
        // giving them back as the top of the heap when they are freed.
        var pieces = [UnsafeMutableRawPointer?](repeating: nil, count: 24 * 1024)
        func burst() {
            for i in pieces.indices {
                pieces[i] = malloc(1024)
                if let piece = pieces[i] { memset(piece, 1, 1024) }
            }
        }
        burst()
        guard let pin = malloc(1024) else { return XCTFail("malloc") }
        defer { free(pin) }
        XCTAssertFalse(pieces.contains(nil))
        let inUse = try XCTUnwrap(FreedMemory.residentAnonymous())
        for piece in pieces { free(piece) }
        let freed = try XCTUnwrap(FreedMemory.residentAnonymous())
        XCTAssertGreaterThan(freed, inUse - (8 << 20), "glibc keeps what was freed resident")

        let first = try XCTUnwrap(memory.returnIfGrown(), "it grew by more than the threshold")
        XCTAssertLessThan(first.after, first.before - (16 << 20), "returned to the kernel")
        XCTAssertNil(memory.returnIfGrown(), "nothing grew since: no second trim of the same pages")

        // A second burst reuses the same free memory (glibc's free count is
        // the same before and after it): it is resident again, and returned again.
        burst()
        for piece in pieces { free(piece) }
        let second = try XCTUnwrap(memory.returnIfGrown(), "the second burst made it grow again")
        XCTAssertLessThan(second.after, second.before - (16 << 20), "returned again")
    }
}
