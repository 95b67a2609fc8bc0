// swift-tools-version:6.0
import PackageDescription

// The parsers that read what clients, upstreams and operators send, built
// with libFuzzer's instrumentation (`make fuzz`, see README.md here). The
// sources are the project's own files, linked in (Sources/ParserFuzz holds
// symlinks), so what is fuzzed is exactly what ships; only the harness is
// new. A package of its own, so the main build never carries the
// sanitizer flags.
let package = Package(
    name: "cache-proxy-fuzz",
    dependencies: [
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
        // For the upstream answer's head (`UpstreamAnswerHead` reads a
        // `ByteBuffer` and gives NIO's HTTP types).
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
    ],
    targets: [
        .executableTarget(
            name: "ParserFuzz",
            dependencies: [
                .product(name: "Yams", package: "Yams"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            path: "Sources/ParserFuzz"
        ),
    ],
    swiftLanguageModes: [.v6]
)
