@testable import CacheProxy
import Foundation
import IOURing
import NIOCore
import NIOPosix
import XCTest

/// The storage backends: the ring itself, the choice at start, and the
/// fallback when io_uring is denied. `make test` runs the whole suite once
/// per backend and once under a seccomp filter that denies io_uring, with
/// `CACHE_PROXY_TEST_EXPECT_BACKEND` saying which backend that run must get.
final class IOBackendTests: XCTestCase {
    /// What this run of the suite must be using.
    var expected: String? {
        ProcessInfo.processInfo.environment["CACHE_PROXY_TEST_EXPECT_BACKEND"]
            ?? (TestBackend.choice == .auto ? nil : TestBackend.choice.rawValue)
    }

    func testTheSuiteRunsOnTheBackendItWasAskedFor() async throws {
        let proxy = try await TestProxy(upstreamsYAML: "  - {host: \"h\", registry: \"127.0.0.1\", port: 1, schema: \"http\"}")
        let uring = try proxy.metric(#"cacheproxy_io_backend{backend="io_uring"}"#)
        let pool = try proxy.metric(#"cacheproxy_io_backend{backend="threadpool"}"#)
        XCTAssertEqual(uring + pool, 1, "exactly one backend in use")
        if let expected {
            XCTAssertEqual(proxy.server.store.writer.backendName, expected)
            XCTAssertEqual(try proxy.metric("cacheproxy_io_backend{backend=\"\(expected)\"}"), 1)
        }
        await proxy.stop()
    }

    /// Every operation the cache needs, straight on the ring: where the ring
    /// is denied (the seccomp run), that it is denied with EPERM.
    func testTheRingDoesEveryStorageOperation() async throws {
        let ring: URing
        do {
            ring = try URing(entries: 8)
        } catch {
            XCTAssertEqual(expected, "threadpool", "io_uring failed where it should work: \(error)")
            XCTAssertEqual(error.errno, EPERM)
            return
        }
        let writer = URingBlobWriter(ring: ring, group: MultiThreadedEventLoopGroup.singleton)
        defer { writer.shutdown() }
        let folder = try makeTemporaryFolder("ring")
        let fd = try await writer.create(folder + "/a")
        // More writes than the ring has slots, at scattered offsets, at once.
        let pieces = (0..<40).map { i in ByteBuffer(bytes: Array(repeating: UInt8(i), count: 1000 + i)) }
        try await withThrowingTaskGroup(of: Void.self) { group in
            var offset: Int64 = 0
            for piece in pieces {
                let at = offset
                group.addTask { try await writer.write(piece, to: fd, at: at) }
                offset += Int64(piece.readableBytes)
            }
            try await group.waitForAll()
        }
        try await writer.sync(fd)
        try await writer.setAttribute("user.test", to: "1234", on: fd)
        await writer.close(fd)
        try await writer.rename(folder + "/a", to: folder + "/b")
        try await writer.syncDirectory(folder)
        let written = try Data(contentsOf: URL(fileURLWithPath: folder + "/b"))
        XCTAssertEqual(written, Data(pieces.flatMap { Array($0.readableBytesView) }))
        XCTAssertEqual(FileAttributes.get("user.test", of: folder + "/b"), "1234")
        XCTAssertFalse(FileManager.default.fileExists(atPath: folder + "/a"))
        // Errors come back as errno, naming the call.
        do {
            _ = try await writer.create(folder + "/b")
            XCTFail("O_EXCL on an existing file")
        } catch StoreError.system(_, let code) {
            XCTAssertEqual(code, EEXIST)
        }
        do {
            try await writer.write(ByteBuffer(string: "x"), to: -1, at: 0)
            XCTFail("a write to fd -1")
        } catch StoreError.system(_, let code) {
            XCTAssertEqual(code, EBADF)
        }
        try await writer.unlink(folder + "/b")
        XCTAssertFalse(FileManager.default.fileExists(atPath: folder + "/b"))
        // After shutdown the ring refuses new work instead of hanging it.
        writer.shutdown()
        do {
            try await writer.unlink(folder + "/never")
            XCTFail("a stopped ring took work")
        } catch StoreError.system(_, let code) {
            XCTAssertEqual(code, ECANCELED)
        }
    }

    /// Far more fills at once than the ring has entries, each writing,
    /// syncing and renaming: what is in flight stays within what the ring
    /// can complete (the rest waits in the queue), nothing spins, and every
    /// file ends whole.
    func testMoreConcurrentFillsThanRingEntriesAllComplete() async throws {
        let ring: URing
        do {
            ring = try URing(entries: 4)
        } catch {
            XCTAssertEqual(expected, "threadpool", "io_uring failed where it should work: \(error)")
            return
        }
        XCTAssertEqual(ring.maxInFlight, 3)
        let writer = URingBlobWriter(ring: ring, group: MultiThreadedEventLoopGroup.singleton)
        defer { writer.shutdown() }
        let folder = try makeTemporaryFolder("ring-many")
        let fills = 24, writes = 32, size = 4096
        let started = ContinuousClock.now
        try await withThrowingTaskGroup(of: Void.self) { group in
            for fill in 0..<fills {
                group.addTask {
                    let fd = try await writer.create(folder + "/tmp-\(fill)")
                    try await withThrowingTaskGroup(of: Void.self) { batch in
                        for piece in 0..<writes {
                            let bytes = ByteBuffer(bytes: Array(repeating: UInt8(truncatingIfNeeded: fill &+ piece), count: size))
                            batch.addTask { try await writer.write(bytes, to: fd, at: Int64(piece * size)) }
                        }
                        try await batch.waitForAll()
                    }
                    try await writer.sync(fd)
                    await writer.close(fd)
                    try await writer.rename(folder + "/tmp-\(fill)", to: folder + "/blob-\(fill)")
                }
            }
            try await group.waitForAll()
        }
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(30))
        XCTAssertGreaterThan(ring.peakInFlight, 0)
        XCTAssertLessThanOrEqual(ring.peakInFlight, ring.maxInFlight, "more in flight than the ring can complete")
        for fill in 0..<fills {
            let data = try Data(contentsOf: URL(fileURLWithPath: folder + "/blob-\(fill)"))
            XCTAssertEqual(data.count, writes * size)
            for piece in 0..<writes {
                XCTAssertEqual(data[piece * size], UInt8(truncatingIfNeeded: fill &+ piece), "fill \(fill) piece \(piece)")
            }
        }
    }

    /// Docker's default seccomp profile: `auto` falls back to the thread
    /// pool and says so; `io_uring` by name refuses to start, naming why.
    func testUnderASeccompFilterAutoFallsBackAndIOUringByNameRefusesToStart() async throws {
        let folder = try makeTemporaryFolder("seccomp")
        let config = """
            upstreams: [{host: "h", registry: "127.0.0.1", port: 1, schema: "http"}]
            storage: {folder: "\(folder)/cache"}
            """
        let wrapper = [scriptPath("without-io-uring")]
        let (daemon, port) = try startProxyProcess(folder: folder, config: config, arguments: ["--io-backend", "auto"],
                                                   command: wrapper)
        let metrics = String(decoding: try curl("http://127.0.0.1:\(port)/metrics").body, as: UTF8.self)
        XCTAssertTrue(metrics.contains(#"cacheproxy_io_backend{backend="threadpool"} 1"#), metrics)
        XCTAssertTrue(metrics.contains(#"cacheproxy_io_backend{backend="io_uring"} 0"#))
        daemon.stop()
        XCTAssertTrue(daemon.log.contains("io_uring unavailable"), daemon.log)
        XCTAssertTrue(daemon.log.contains("Operation not permitted"), daemon.log)

        let (status, output) = try shell(wrapper[0], [proxyBinary(), "--config", folder + "/c.yaml",
                                                      "--port", String(try freePort()), "--io-backend", "io_uring"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("io_uring"), output)
        XCTAssertTrue(output.contains("Operation not permitted"), output)
    }

    /// A fill cancelled at the shutdown deadline still deletes its file:
    /// the backend must run a call made from a cancelled task.
    func testAStorageCallFromACancelledTaskStillRuns() async throws {
        let writer = try TestBackend.writer()
        defer { writer.shutdown() }
        let folder = try makeTemporaryFolder("cancelled")
        _ = FileManager.default.createFile(atPath: folder + "/tmp-file", contents: Data("x".utf8))
        let task = Task {
            while !Task.isCancelled { await Task.yield() }
            try await writer.unlink(folder + "/tmp-file")
        }
        task.cancel()
        try await task.value
        XCTAssertFalse(FileManager.default.fileExists(atPath: folder + "/tmp-file"))
    }

    func testABadBackendNameIsRefusedNamingTheKey() throws {
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: """
            api: {port: 5000}
            upstreams: [{host: h, registry: r}]
            storage: {folder: /x, io_backend: fast}
            """)) { error in
            XCTAssertTrue("\(error)".contains("storage.io_backend"), "\(error)")
        }
        let (status, output) = try shell(proxyBinary(), ["--config", "/nonexistent", "--io-backend", "fast"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("io-backend") || output.contains("/nonexistent"), output)
    }
}
