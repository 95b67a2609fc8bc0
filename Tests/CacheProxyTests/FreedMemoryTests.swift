import IOURing
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Memory the process freed goes back to the kernel when the proxy asks
/// (every `FreedMemory.interval` while serving, when the resident size
/// grew), instead of staying resident in glibc's arenas until the same
/// thread allocates again.
final class FreedMemoryTests: XCTestCase {
    func testFreedHeapPagesLeaveTheResidentSetAfterEachBurst() throws {
        // From a trimmed heap (earlier tests in this process leave free
        // memory behind), so that a burst needs pages of its own.
        FreedMemory.returnAll()
        let memory = FreedMemory()
        let start = try XCTUnwrap(FreedMemory.residentAnonymous())
        // 24 MiB in 1 KiB pieces (far below the mmap threshold: from the
        // heap). Every 16th stays allocated: glibc cannot give the others
        // back by shrinking the heap, only a trim can.
        var pieces = [UnsafeMutableRawPointer?](repeating: nil, count: 24 * 1024)
        let freedOnes = pieces.indices.filter { $0 % 16 != 0 }
        func burst(_ indices: [Int]) {
            for i in indices {
                pieces[i] = malloc(1024)
                if let piece = pieces[i] { memset(piece, 1, 1024) }
            }
        }
        burst(Array(pieces.indices))
        defer { for piece in pieces { free(piece) } }
        XCTAssertFalse(pieces.contains(nil))
        let inUse = try XCTUnwrap(FreedMemory.residentAnonymous())
        XCTAssertGreaterThan(inUse, start + (16 << 20), "the burst's pages")
        for i in freedOnes { free(pieces[i]); pieces[i] = nil }
        let freed = try XCTUnwrap(FreedMemory.residentAnonymous())
        XCTAssertGreaterThan(freed, inUse - (4 << 20), "glibc keeps what was freed resident")

        let first = try XCTUnwrap(memory.returnIfGrown(), "it grew by more than the threshold")
        XCTAssertLessThan(first.after, first.before - (12 << 20), "returned to the kernel")
        XCTAssertNil(memory.returnIfGrown(), "nothing grew since: no second trim of the same pages")

        // A second burst reuses the same free memory (glibc's free count is
        // the same before and after it): it is resident again, and returned again.
        burst(freedOnes)
        for i in freedOnes { free(pieces[i]); pieces[i] = nil }
        let second = try XCTUnwrap(memory.returnIfGrown(), "the second burst made it grow again")
        XCTAssertLessThan(second.after, second.before - (12 << 20), "returned again")
    }

    /// A fill's write buffer has pages of its own: they leave the resident
    /// set when it is freed, even after a larger block was freed before
    /// (which, left to glibc, raises the threshold and puts the next
    /// buffers in an arena that keeps their pages).
    func testAFillsWriteBufferLeavesTheResidentSetWhenFreed() throws {
        FreedMemory.mapAllocations(from: 1 << 20)
        let larger = malloc(4 << 20)
        if let larger { memset(larger, 1, 4 << 20) }
        free(larger)
        FreedMemory.returnAll()
        let before = try XCTUnwrap(FreedMemory.residentAnonymous())
        let buffer = try XCTUnwrap(malloc(1 << 20))
        memset(buffer, 1, 1 << 20)
        let touched = try XCTUnwrap(FreedMemory.residentAnonymous())
        XCTAssertGreaterThan(touched, before + (900 << 10), "the buffer's pages")
        free(buffer)
        let after = try XCTUnwrap(FreedMemory.residentAnonymous())
        XCTAssertLessThan(after, touched - (900 << 10), "gone with the free, no trim needed")
    }
}
