import Foundation
import NIOConcurrencyHelpers
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// An operator sees what the upstream counts: requests by method (Docker
/// Hub counts a manifest `GET` as a pull, a `HEAD` is free) and the pulls
/// it says are left (`ratelimit-remaining`).
final class RateLimitMetricsTests: XCTestCase {
    func testUpstreamRequestsAreCountedByMethodAndTheRateLimitLeftIsShown() async throws {
        let left = NIOLockedValueBox(100)
        let upstream = try await FakeUpstream { head in
            let remaining = left.withLockedValue { value -> Int in
                if head.method == .GET { value -= 1 }
                return value
            }
            return .init(headers: ["content-type": "application/vnd.oci.image.manifest.v1+json",
                                   "ratelimit-limit": "100;w=21600", "ratelimit-remaining": "\(remaining);w=21600"],
                         body: Array(#"{"schemaVersion":2}"#.utf8))
        }
        // Manifests passed through as they come (`manifests: passthrough`):
        // every client request is one upstream request of the same method.
        let proxy = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\", manifests: passthrough}")
        let url = "\(proxy.base)/v2/library/alpine/manifests/3.20"
        XCTAssertEqual(try curl(url).code, 200)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_ratelimit_remaining{upstream="127.0.0.1"}"#), 99)
        XCTAssertEqual(try shell("curl", ["-sI", url]).status, 0)
        XCTAssertEqual(try curl(url).code, 200)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="GET",code="200"}"#), 2)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_requests_total{upstream="127.0.0.1",method="HEAD",code="200"}"#), 1)
        XCTAssertEqual(try proxy.metric(#"cacheproxy_upstream_ratelimit_remaining{upstream="127.0.0.1"}"#), 98)
        await proxy.stop()
        await upstream.stop()
    }

    func testTheRateLimitHeaderIsReadAsDockerHubWritesIt() {
        let read = { (value: String) in UpstreamClient.rateLimitRemaining(value) }
        XCTAssertEqual(read("76;w=21600"), 76)
        XCTAssertEqual(read(" 5 "), 5)
        XCTAssertNil(read("-1;w=1"))
        XCTAssertNil(read("many"))
        XCTAssertNil(read(""))
    }
}
