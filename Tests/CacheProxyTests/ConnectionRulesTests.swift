import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// The connection's timeout rules, the request-head checks and the redirect
/// rules on their own, without IO.
final class ConnectionRulesTests: XCTestCase {
    let limits = ConnectionTimeoutsStateMachine.Limits(head: .seconds(3), idle: .seconds(10), requestBody: .seconds(5))
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func testOnlyTheWaitInProgressIsTimed() {
        var m = ConnectionTimeoutsStateMachine(limits: limits, now: t0)
        XCTAssertEqual(m.deadline?.kind, .idle)
        m.headBytesArrived(now: t0 + .seconds(1))
        XCTAssertEqual(m.deadline?.kind, .head)
        XCTAssertEqual(m.deadline?.at, t0 + .seconds(4), "from the head's first byte")
        m.headReceived()
        XCTAssertNil(m.deadline, "no read asked for yet")
        m.readRequested(now: t0 + .seconds(2))
        XCTAssertEqual(m.deadline?.kind, .requestBody)
        m.bodyReceived()
        XCTAssertNil(m.deadline)
        m.requestEnded(now: t0 + .seconds(3))
        XCTAssertNil(m.deadline, "the request waits for its answer, untimed")
    }

    func testNothingIsTimedWhileAResponseIsBeingWritten() {
        var m = ConnectionTimeoutsStateMachine(limits: limits, now: t0)
        m.headBytesArrived(now: t0)
        m.headReceived()
        m.requestEnded(now: t0)
        XCTAssertNil(m.deadline, "the request waits for its answer, untimed")
        m.responseStarted()
        XCTAssertNil(m.deadline, "sending is the send timeout's business")
        m.readRequested(now: t0 + .seconds(60))
        XCTAssertNil(m.deadline)
        m.responseFinished(now: t0 + .seconds(100))
        XCTAssertEqual(m.deadline?.kind, .idle)
        XCTAssertEqual(m.deadline?.at, t0 + .seconds(110), "from the last byte written")
    }

    func testAPipelinedHeadIsTimedFromTheEndOfTheAnswerBeforeIt() {
        var m = ConnectionTimeoutsStateMachine(limits: limits, now: t0)
        m.headBytesArrived(now: t0)
        m.headReceived()
        m.requestEnded(now: t0)
        m.responseStarted()
        m.headBytesArrived(now: t0 + .seconds(1))
        XCTAssertNil(m.deadline)
        m.responseFinished(now: t0 + .seconds(20))
        XCTAssertEqual(m.deadline?.kind, .head)
        XCTAssertEqual(m.deadline?.at, t0 + .seconds(23))
    }

    func testABodyAfterAnEarlyAnswerIsNotAHead() {
        var m = ConnectionTimeoutsStateMachine(limits: limits, now: t0)
        m.headBytesArrived(now: t0)
        m.headReceived()
        m.responseStarted()
        m.responseFinished(now: t0 + .seconds(1))  // answered before the body ended
        XCTAssertFalse(m.awaitingHead, "the rest of the body is still a body")
        m.readRequested(now: t0 + .seconds(1))
        XCTAssertEqual(m.deadline?.kind, .requestBody)
        m.requestEnded(now: t0 + .seconds(2))
        XCTAssertTrue(m.awaitingHead)
        XCTAssertEqual(m.deadline?.kind, .idle)
    }

    func testRequestHeadChecks() {
        let router = Router(upstreams: [.init(host: "mirror:5000", registry: "r", port: 443, schema: "https", aliases: [])])
        func check(_ method: HTTPMethod, _ uri: String, _ headers: HTTPHeaders = ["host": "mirror:5000"]) -> RequestValidator.Verdict {
            RequestValidator.check(HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers), router: router)
        }
        func status(_ verdict: RequestValidator.Verdict) -> UInt? {
            if case .refuse(let error, _) = verdict { return error.status.code }
            return nil
        }
        XCTAssertEqual(status(check(.CONNECT, "mirror:5000")), 405)
        XCTAssertEqual(status(check(.GET, "@127.0.0.1:22/v2/")), 400)
        XCTAssertEqual(status(check(.GET, "http://other:5000/v2/")), 421)
        XCTAssertEqual(status(check(.GET, "http://u@mirror:5000/v2/")), 400)
        XCTAssertEqual(status(check(.GET, "*")), 400)
        XCTAssertEqual(check(.OPTIONS, "*"), .answerOptions)
        XCTAssertEqual(status(check(.GET, "/v2/", ["host": "a", "Host": "b"])), 400)
        XCTAssertEqual(status(check(.GET, "/v2/", [:])), 400)
        XCTAssertEqual(status(check(.POST, "/v2/", ["host": "mirror:5000", "content-length": "1", "transfer-encoding": "chunked"])), 400)
        XCTAssertEqual(status(check(.POST, "/v2/", ["host": "mirror:5000", "content-length": "+1"])), 400)
        guard case .accept(let head) = check(.GET, "http://MIRROR:5000/v2/x?n=1", ["host": "ignored"]) else {
            return XCTFail("absolute-form for a configured host")
        }
        XCTAssertEqual(head.uri, "/v2/x?n=1")
        XCTAssertEqual(head.headers["host"], ["mirror:5000"])
        guard case .accept = check(.GET, "/v2/a/blobs/sha256:abc?ns=docker.io") else { return XCTFail("origin-form") }
    }

    func testRedirectRules() throws {
        let base = try XCTUnwrap(RedirectTarget("https://reg.example/v2/a/blobs/x"))
        XCTAssertTrue(try XCTUnwrap(RedirectTarget("/elsewhere", relativeTo: base.url)).sameOrigin(as: base))
        XCTAssertTrue(try XCTUnwrap(RedirectTarget("https://REG.example:443/x")).sameOrigin(as: base))
        XCTAssertFalse(try XCTUnwrap(RedirectTarget("https://reg.example:8443/x")).sameOrigin(as: base), "another port")
        XCTAssertFalse(try XCTUnwrap(RedirectTarget("http://reg.example/x")).sameOrigin(as: base), "a downgrade")
        XCTAssertFalse(try XCTUnwrap(RedirectTarget("https://cdn.example/x")).sameOrigin(as: base))
        XCTAssertNil(RedirectTarget("file:///etc/passwd"))
        XCTAssertNil(RedirectTarget("ftp://reg.example/x"))
        XCTAssertNil(RedirectTarget("https://user@reg.example/x"))
        XCTAssertNil(RedirectTarget("relative/path", relativeTo: base.url))
        XCTAssertEqual(RedirectTarget("/x?next=https://evil.example/", relativeTo: base.url)?.host, "reg.example",
                       "a URL in the query does not make a location absolute")
    }
}
