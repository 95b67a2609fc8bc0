// swift-tools-version:6.0
// The floor of a manifest pull by tag on SwiftNIO: see main.swift. Built
// by benchmarks/manifest_floor.sh against the project's own copy of
// swift-nio (.build/checkouts), so it needs no network.
import PackageDescription

let package = Package(
    name: "nio-floor",
    dependencies: [.package(path: "../../.build/checkouts/swift-nio")],
    targets: [
        .executableTarget(name: "nio-floor", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ])
    ]
)
