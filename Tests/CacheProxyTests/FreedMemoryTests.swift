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

    /// A large buffer has pages of its own, which go with it, even after a
    /// larger block was freed before (left to glibc, that raises the
    /// threshold to the freed block's size, and the next buffers come from
    /// an arena that keeps their pages). Counted by glibc itself, not by
    /// the resident size, which other threads move. 16 MiB, not a fill's
    /// 1 MiB: an arena may hold a free chunk of a megabyte from earlier
    /// tests, never one of sixteen.
    func testALargeBufferHasPagesOfItsOwnEvenAfterALargerOneWasFreed() throws {
        FreedMemory.mapAllocations(from: 1 << 20)
        free(malloc(24 << 20))
        let before = FreedMemory.mappedBytes()
        let buffer = try XCTUnwrap(malloc(16 << 20))
        XCTAssertGreaterThanOrEqual(FreedMemory.mappedBytes(), before + (16 << 20), "mapped, not from an arena")
        free(buffer)
        XCTAssertEqual(FreedMemory.mappedBytes(), before, "unmapped with the free")
    }
}
