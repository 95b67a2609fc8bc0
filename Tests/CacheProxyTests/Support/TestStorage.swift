@testable import CacheProxy
import Foundation
import Logging
import NIOPosix
import ProxyMetrics

/// Which storage backend this run of the suite uses: `make test` runs the
/// suite once per backend (`CACHE_PROXY_TEST_IO_BACKEND=io_uring`, then
/// `threadpool`) and once more under a seccomp filter that denies io_uring
/// (`auto`, expected to fall back).
enum TestBackend {
    static var choice: ProxyConfig.IOBackendChoice {
        ProcessInfo.processInfo.environment["CACHE_PROXY_TEST_IO_BACKEND"].flatMap(ProxyConfig.IOBackendChoice.init) ?? .auto
    }

    /// The YAML value for `storage.io_backend`.
    static var yaml: String { choice.rawValue }

    /// A writer of this run's backend.
    static func writer() throws -> any BlobWriter {
        try IOBackend.select(choice, pool: .singleton, group: MultiThreadedEventLoopGroup.singleton,
                             logger: Logger(label: "test"))
    }
}

/// A store on `folder` with this run's backend.
func makeStore(_ folder: String, metrics: ProxyMetrics = ProxyMetrics(), maxSize: Int64? = nil,
               fsync: Bool = false) throws -> BlobStore {
    var config = ProxyConfig.Storage(folder: folder, fsync: fsync)
    config.maxSize = maxSize
    return try BlobStore(config: config, writer: try TestBackend.writer(), metrics: metrics,
                         logger: Logger(label: "test"))
}

/// Polls `condition` every 20 ms until it holds or `seconds` pass; returns
/// whether it held. For effects that follow a response (a publish lands
/// just after the last byte a client got).
func eventually(within seconds: Double = 5, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return true }
        usleep(20_000)
    }
    return try condition()
}

/// One upstream on `127.0.0.1:port`, as a YAML list item for `TestProxy`.
func localUpstreamYAML(_ port: Int) -> String {
    "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(port), schema: \"http\"}"
}
