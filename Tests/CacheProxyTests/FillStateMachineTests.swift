import XCTest
@testable import CacheProxy

final class FillStateMachineTests: XCTestCase {
    func testHappyPathHoldsBackTheTailUntilVerified() {
        var m = FillStateMachine(holdBack: 10)
        XCTAssertEqual(m.followerMark, -1)
        m.start()
        XCTAssertEqual(m.state, .requesting)
        m.start()
        XCTAssertEqual(m.state, .requesting, "a second start does nothing")
        m.upstreamResponded(status: 200, contentLength: 100)
        XCTAssertEqual(m.followerMark, 0)
        XCTAssertEqual(m.bytesWritten(50), .none)
        XCTAssertEqual(m.followerMark, 50)
        XCTAssertEqual(m.bytesWritten(50), .none)
        XCTAssertEqual(m.followerMark, 90, "the last 10 bytes wait for the digest")
        XCTAssertEqual(m.upstreamEnded(), .none)
        XCTAssertEqual(m.state, .verifying(size: 100))
        XCTAssertEqual(m.followerMark, 90)
        XCTAssertEqual(m.digestChecked(matches: true), .publish(size: 100))
        XCTAssertEqual(m.state, .verified(size: 100))
        XCTAssertEqual(m.followerMark, 100, "verified bytes go out before the fsync and rename")
        XCTAssertFalse(m.isFinished)
        m.publishSucceeded()
        XCTAssertEqual(m.state, .published(size: 100))
        XCTAssertEqual(m.followerMark, 100)
        XCTAssertTrue(m.isFinished)
    }

    func testUnknownLengthHoldsBackFromWhatWasWritten() {
        var m = FillStateMachine(holdBack: 10)
        m.start()
        m.upstreamResponded(status: 200, contentLength: nil)
        _ = m.bytesWritten(5)
        XCTAssertEqual(m.followerMark, 0)
        _ = m.bytesWritten(20)
        XCTAssertEqual(m.followerMark, 15)
        XCTAssertEqual(m.upstreamEnded(), .none)
        XCTAssertEqual(m.state, .verifying(size: 25))
    }

    func testMismatchDiscards() {
        var m = FillStateMachine(holdBack: 10)
        m.start()
        m.upstreamResponded(status: 200, contentLength: 4)
        _ = m.bytesWritten(4)
        _ = m.upstreamEnded()
        XCTAssertEqual(m.digestChecked(matches: false), .discard(.digestMismatch))
        XCTAssertEqual(m.state, .failed(.digestMismatch))
        XCTAssertEqual(m.followerMark, Int64.max, "followers wake and see the failure")
        m.publishSucceeded()
        XCTAssertEqual(m.state, .failed(.digestMismatch), "nothing after a failure")
    }

    func testUpstreamErrorStatusIsRejectedNotStored() {
        for status in [401, 404, 429, 500, 206] {
            var m = FillStateMachine()
            m.start()
            m.upstreamResponded(status: status, contentLength: 10)
            XCTAssertEqual(m.state, .rejected(status: status))
            XCTAssertEqual(m.bytesWritten(10), .none)
        }
    }

    func testTooLongAndTruncatedFail() {
        var m = FillStateMachine()
        m.start()
        m.upstreamResponded(status: 200, contentLength: 10)
        XCTAssertEqual(m.bytesWritten(11), .discard(.tooLong(expected: 10)))

        var t = FillStateMachine()
        t.start()
        t.upstreamResponded(status: 200, contentLength: 10)
        _ = t.bytesWritten(4)
        XCTAssertEqual(t.upstreamEnded(), .discard(.truncated(expected: 10, received: 4)))
    }

    /// A disk that failed during the fill: still verified and served to
    /// followers, released instead of published.
    func testALostDiskReleasesTheVerifiedBlobInsteadOfPublishing() {
        var m = FillStateMachine(holdBack: 10)
        m.start()
        m.upstreamResponded(status: 200, contentLength: 100)
        _ = m.bytesWritten(40)
        m.storageLost()
        _ = m.bytesWritten(60)
        XCTAssertEqual(m.followerMark, 90, "the same hold-back from memory")
        _ = m.upstreamEnded()
        XCTAssertEqual(m.digestChecked(matches: true), .release(size: 100))
        XCTAssertEqual(m.state, .delivered(size: 100))
        XCTAssertEqual(m.followerMark, 100)
        XCTAssertTrue(m.isFinished)

        var wrong = FillStateMachine()
        wrong.start()
        wrong.upstreamResponded(status: 200, contentLength: 1)
        wrong.storageLost()
        _ = wrong.bytesWritten(1)
        _ = wrong.upstreamEnded()
        XCTAssertEqual(wrong.digestChecked(matches: false), .discard(.digestMismatch), "never released unverified")
    }

    func testAVerifiedBlobNotKeptIsDelivered() {
        var m = verifiedFill()
        m.notKept()
        XCTAssertEqual(m.state, .delivered(size: 1))
        m.publishSucceeded()
        XCTAssertEqual(m.state, .delivered(size: 1))
    }

    /// A one-byte fill whose digest matched, not yet published.
    func verifiedFill() -> FillStateMachine {
        var m = FillStateMachine()
        m.start()
        m.upstreamResponded(status: 200, contentLength: 1)
        _ = m.bytesWritten(1)
        _ = m.upstreamEnded()
        _ = m.digestChecked(matches: true)
        return m
    }

    func testStorageFailureAfterVerificationFails() {
        var m = verifiedFill()
        XCTAssertEqual(m.fail(.storage("ENOSPC")), .discard(.storage("ENOSPC")))
        XCTAssertEqual(m.state, .failed(.storage("ENOSPC")))
    }

    func testFailureAfterTheEndChangesNothing() {
        var m = verifiedFill()
        m.publishSucceeded()
        XCTAssertEqual(m.fail(.upstream("late")), .none)
        XCTAssertEqual(m.state, .published(size: 1))
    }
}
