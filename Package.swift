// swift-tools-version:6.0
import PackageDescription

/// The project's own modules keep Swift's run-time exclusivity checks in
/// every build. `make release` turns them off for the dependencies only
/// (`-Xswiftc -enforce-exclusivity=unchecked`, which this setting, passed to
/// the frontend after it, overrides here): SwiftNIO's channel machinery made
/// ~90% of the checks on a hit, ~9% of the instructions of a hit and ~12%
/// of a pull by tag (benchmarks/RESULTS.md, "2026-12-06 (night): the dependencies'
/// exclusivity checks"). What stays checked is access to storage the
/// project declares; a dependency's inlinable accessor (`NIOLoopBoundBox`'s
/// `value`, say) comes without its checks even where it is inlined here.
/// Debug and test builds (`make test`) check everything.
let ownCode: [SwiftSetting] = [.unsafeFlags(["-Xfrontend", "-enforce-exclusivity=checked"])]

let package = Package(
    name: "cache-proxy",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "cache-proxy", targets: ["cache-proxy"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-async-algorithms.git", from: "1.1.4"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
    ],
    targets: [
        .systemLibrary(
            name: "CURing",
            path: "Sources/CURing",
            pkgConfig: "liburing",
            providers: [.apt(["liburing-dev"])]
        ),
        .target(
            name: "IOURing",
            dependencies: ["CURing", .product(name: "NIOConcurrencyHelpers", package: "swift-nio")],
            path: "Sources/IOURing",
            swiftSettings: ownCode
        ),
        .target(
            name: "ProxyMetrics",
            dependencies: [
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            path: "Sources/Metrics",
            swiftSettings: ownCode
        ),
        .target(
            name: "CacheProxy",
            dependencies: [
                "IOURing",
                "ProxyMetrics",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "AsyncAlgorithms", package: "swift-async-algorithms"),
                .product(name: "DequeModule", package: "swift-collections"),
            ],
            path: "Sources/CacheProxy",
            swiftSettings: ownCode
        ),
        .executableTarget(
            name: "cache-proxy",
            dependencies: [
                "CacheProxy",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
            ],
            path: "Sources/CacheProxyMain",
            swiftSettings: ownCode
        ),
        .testTarget(
            name: "CacheProxyTests",
            dependencies: [
                "CacheProxy",
                "ProxyMetrics",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
