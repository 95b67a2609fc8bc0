// swift-tools-version:6.0
// The floor of a cold fill on SwiftNIO: see main.swift. Built by
// benchmarks/fill_floor.sh against the project's own copies of swift-nio
// and swift-crypto (.build/checkouts), so it needs no network.
import PackageDescription

let package = Package(
    name: "fill-floor",
    dependencies: [
        .package(path: "../../.build/checkouts/swift-nio"),
        .package(path: "../../.build/checkouts/swift-crypto"),
    ],
    targets: [
        .executableTarget(name: "fill-floor", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "Crypto", package: "swift-crypto"),
        ])
    ]
)
