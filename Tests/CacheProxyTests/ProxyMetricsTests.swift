import Foundation
import ProxyMetrics
import XCTest

final class ProxyMetricsTests: XCTestCase {
    func testExpositionHasHelpTypesBoundedLabelsAndProcessMetrics() {
        let metrics = ProxyMetrics()
        metrics.requestFinished(kind: "blob", method: "GET", code: 200, seconds: 0.002)
        metrics.requestFinished(kind: "blob", method: "GET", code: 200, seconds: 0.003)
        metrics.requestFinished(kind: "passthrough", method: "BREW", code: 405, seconds: 0.01)
        metrics.upstreamResponse(upstream: "hub", method: "HEAD", code: 200, rateLimitRemaining: 97)
        metrics.upstreamResponse(upstream: "hub", method: "PURGE", code: 0)
        metrics.setIOBackend("threadpool")
        metrics.blobHits.increment()
        let text = metrics.exposition()
        XCTAssertTrue(text.contains(#"cacheproxy_requests_total{kind="blob",method="GET",code="200"} 2"#), text)
        XCTAssertTrue(text.contains(#"method="other""#), "unknown methods fold into one label value")
        XCTAssertTrue(text.contains(#"cacheproxy_upstream_requests_total{upstream="hub",method="HEAD",code="200"} 1"#), text)
        XCTAssertTrue(text.contains(#"cacheproxy_upstream_requests_total{upstream="hub",method="other",code="0"} 1"#), text)
        XCTAssertTrue(text.contains(#"cacheproxy_upstream_ratelimit_remaining{upstream="hub"} 97"#), text)
        XCTAssertTrue(text.contains(#"cacheproxy_request_duration_seconds_count{kind="blob"} 2"#), text)
        XCTAssertTrue(text.contains(#"cacheproxy_io_backend{backend="threadpool"} 1"#))
        XCTAssertTrue(text.contains(#"cacheproxy_io_backend{backend="io_uring"} 0"#))
        XCTAssertTrue(text.contains("cacheproxy_blob_hits_total 1"))
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"] {
            XCTAssertTrue(text.contains("# TYPE \(name) "), name)
        }
        // The start time is the process's, not the first scrape's: this test
        // process started before the test ran.
        let start = text.split(separator: "\n").first { $0.hasPrefix("process_start_time_seconds ") }
            .flatMap { Double($0.split(separator: " ")[1]) } ?? 0
        XCTAssertGreaterThan(start, 1_600_000_000)
        XCTAssertLessThan(start, Date().timeIntervalSince1970 - 0.05)
        // Every family has its help text (promtool's lint wants it).
        let types = text.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.count
        let helps = text.split(separator: "\n").filter { $0.hasPrefix("# HELP ") }.count
        XCTAssertEqual(types, helps)
    }
}
