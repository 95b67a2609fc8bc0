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
