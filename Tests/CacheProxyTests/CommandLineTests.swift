import Foundation
import XCTest

/// The `cache-proxy` binary itself: flags, config errors, SIGTERM.
final class CommandLineTests: XCTestCase {
    var binary: String { proxyBinary() }

    func testBadConfigStopsTheStartWithOneLineNamingTheKey() throws {
        let folder = try makeTemporaryFolder("cli")
        let cases = [
            ("api: {port: 70000}\nupstreams: [{host: h, registry: r}]\nstorage: {folder: /tmp/x}", "api.port"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: r, schema: gopher}]\nstorage: {folder: /tmp/x}",
             "upstreams[0].schema"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: r}]\nstorage: {folder: /tmp/x}\nsurprise: 1", "surprise"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: r}]", "storage"),
            ("api: {port: 5000}\nupstreams: [{host: h, registry: \"r:5000\"}]\nstorage: {folder: /tmp/x}",
             "upstreams[0].registry"),
        ]
        for (yaml, key) in cases {
            try yaml.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
            let (status, output) = try shell(binary, ["--config", folder + "/c.yaml"])
            XCTAssertNotEqual(status, 0)
            let lines = output.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, output)
            XCTAssertTrue(output.contains(key), "\(key) not named in: \(output)")
        }
        let (status, output) = try shell(binary, ["--config", folder + "/missing.yaml"])
        XCTAssertNotEqual(status, 0)
        XCTAssertTrue(output.contains("missing.yaml"), output)
    }

    /// The systemd unit runs the proxy as a dynamic user with no
    /// capabilities: as such a user it starts, and fills a blob on the event
    /// loop's own upstream connection. (TCP_NODELAY was set at the socket
    /// level, where its number is SO_DEBUG, which needs CAP_NET_ADMIN: the
    /// daemon exited at start with "Permission denied".)
    func testAnUnprivilegedUserRunsTheProxy() async throws {
        guard getuid() == 0 else { throw XCTSkip("needs root, to run the proxy as another user") }
        let folder = try makeTemporaryFolder("unprivileged")
        XCTAssertEqual(chmod(folder, 0o777), 0)
        // A copy the user can reach wherever the checkout lives (its
        // libraries come from the toolchain's folder, by its run path).
        let binary = folder + "/cache-proxy"
        try FileManager.default.copyItem(atPath: proxyBinary(), toPath: binary)
        XCTAssertEqual(chmod(binary, 0o755), 0)
        let blob = FaultInjectionTests.randomBytes(300_000)
        let upstream = try await FakeUpstream(host: "127.0.0.1") { _ in .init(body: blob) }
        let (daemon, port) = try startProxyProcess(folder: folder, config: """
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(folder)/cache"}
            """, command: ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], binary: binary)
        let result = try curl("http://127.0.0.1:\(port)/v2/a/blobs/\(FaultInjectionTests.digest(of: blob))")
        XCTAssertEqual(result.code, 200, daemon.log)
        XCTAssertTrue(Array(result.body) == blob, "the blob, verified")
        daemon.stop()
        await upstream.stop()
    }

    func testFlagsOverrideAndSIGTERMExitsCleanly() throws {
        let folder = try makeTemporaryFolder("cli")
        try """
            api: {hostname: "127.0.0.1", port: "1"}
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: 9, schema: "http"}]
            storage: {folder: "/nonexistent/never-used"}
            """.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
        let port = try freePort()
        let daemon = try Daemon(binary, ["--config", folder + "/c.yaml", "--port", String(port), "--storage", folder + "/cache"],
                                logPath: folder + "/log")
        try waitForPort(port)
        XCTAssertEqual(try curl("http://127.0.0.1:\(port)/readyz").code, 200)
        XCTAssertTrue(FileManager.default.fileExists(atPath: folder + "/cache/blobs"), "--storage was used")
        let started = Date()
        kill(daemon.process.processIdentifier, SIGTERM)
        daemon.process.waitUntilExit()
        XCTAssertEqual(daemon.process.terminationStatus, 0, daemon.log)
        XCTAssertLessThan(Date().timeIntervalSince(started), 5)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder + "/cache/tmp"), [])
    }

    /// The binary, configured with `shutdown` seconds, against an upstream
    /// that trickles a 2 MB blob for ~20 s, with one client downloading it.
    private func startWithATricklingDownload(shutdown: Int) async throws
        -> (daemon: Daemon, folder: String, upstream: FakeUpstream, client: Task<(exit: Int32, body: Data, code: Int), Error>) {
        let bytes = FaultInjectionTests.randomBytes(2_000_000)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 20_000, delay: .milliseconds(200)) }
        let folder = try makeTemporaryFolder("cli")
        let port = try freePort()
        try """
            api: {hostname: "127.0.0.1", port: \(port)}
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(folder)/cache", fsync: false}
            timeouts: {shutdown: \(shutdown)}
            """.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
        let daemon = try Daemon(binary, ["--config", folder + "/c.yaml"], logPath: folder + "/log")
        try waitForPort(port)
        let url = "http://127.0.0.1:\(port)/v2/a/blobs/\(FaultInjectionTests.digest(of: bytes))"
        let client = Task.detached { try curl(url) }
        for _ in 0..<200 where upstream.requests.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        try await Task.sleep(for: .milliseconds(300))  // bytes are flowing
        return (daemon, folder, upstream, client)
    }

    private func secondsToExit(_ daemon: Daemon, limit: TimeInterval = 30) -> TimeInterval {
        let started = Date()
        while daemon.process.isRunning, Date().timeIntervalSince(started) < limit { usleep(20_000) }
        return Date().timeIntervalSince(started)
    }

    func testTheShutdownTimeoutBoundsTheWholeDrain() async throws {
        let (daemon, folder, upstream, client) = try await startWithATricklingDownload(shutdown: 2)
        kill(daemon.process.processIdentifier, SIGTERM)
        let seconds = secondsToExit(daemon)
        XCTAssertFalse(daemon.process.isRunning)
        XCTAssertLessThan(seconds, 3.5, "timeouts.shutdown is 2 s, in total")
        XCTAssertGreaterThan(seconds, 1.5, "in-flight work had its grace")
        XCTAssertEqual(daemon.process.terminationStatus, 0, daemon.log)
        let download = try await client.value
        XCTAssertNotEqual(download.exit, 0, "the unfinished download was cut, not completed")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder + "/cache/tmp"), [])
        XCTAssertEqual(FileManager.default.subpaths(atPath: folder + "/cache/blobs")?.filter { $0.count > 70 } ?? [], [])
        await upstream.stop()
    }

    func testASecondSignalExitsAtOnceLeavingNothingPartial() async throws {
        let (daemon, folder, upstream, client) = try await startWithATricklingDownload(shutdown: 30)
        kill(daemon.process.processIdentifier, SIGTERM)
        try await Task.sleep(for: .milliseconds(300))
        XCTAssertTrue(daemon.process.isRunning, "the first signal drains")
        kill(daemon.process.processIdentifier, SIGTERM)
        XCTAssertLessThan(secondsToExit(daemon), 1.5)
        XCTAssertFalse(daemon.process.isRunning)
        _ = try await client.value
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder + "/cache/tmp"), [])
        XCTAssertEqual(FileManager.default.subpaths(atPath: folder + "/cache/blobs")?.filter { $0.count > 70 } ?? [], [])
        await upstream.stop()
    }

    func testAPassThroughWaitingOnASilentUpstreamDoesNotHoldTheShutdown() async throws {
        let upstream = try await FakeUpstream { _ in .init(silent: true) }
        let folder = try makeTemporaryFolder("cli")
        let port = try freePort()
        try """
            api: {hostname: "127.0.0.1", port: \(port)}
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(folder)/cache"}
            timeouts: {shutdown: 2, upstream: 60}
            """.write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
        let daemon = try Daemon(binary, ["--config", folder + "/c.yaml"], logPath: folder + "/log")
        try waitForPort(port)
        let client = Task.detached { try curl("http://127.0.0.1:\(port)/v2/a/manifests/latest") }
        for _ in 0..<200 where upstream.requests.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        kill(daemon.process.processIdentifier, SIGTERM)
        XCTAssertLessThan(secondsToExit(daemon), 3.5)
        XCTAssertFalse(daemon.process.isRunning)
        XCTAssertEqual(daemon.process.terminationStatus, 0, daemon.log)
        _ = try await client.value
        await upstream.stop()
    }
}

extension CommandLineTests {
    /// The shutdown coordinator with a real process: SIGTERM while a 64 MiB
    /// blob streams from a slow upstream. The listener closes (idle
    /// keep-alive connections too: a readiness probe sees the refusal), the
    /// download finishes whole, the blob is published, exit 0, and after a
    /// restart it is a hit.
    func testSIGTERMDuringALargeSlowFillFinishesItAndKeepsTheBlob() async throws {
        let bytes = FaultInjectionTests.randomBytes(64 << 20)
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 1 << 20, delay: .milliseconds(40)) }
        let folder = try makeTemporaryFolder("drain")
        let config = """
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(folder)/cache", io_backend: \(TestBackend.yaml)}
            timeouts: {shutdown: 30}
            """
        let (daemon, port) = try startProxyProcess(folder: folder, config: config)
        let idle = try RawSocket(port: port)
        let url = "http://127.0.0.1:\(port)/v2/a/blobs/\(FaultInjectionTests.digest(of: bytes))"
        let client = Task.detached { try curl(url) }
        for _ in 0..<200 where upstream.requests.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        try await Task.sleep(for: .milliseconds(500))
        kill(daemon.process.processIdentifier, SIGTERM)
        try await Task.sleep(for: .milliseconds(200))
        XCTAssertTrue(daemon.process.isRunning, "draining")
        XCTAssertEqual(idle.receive(), [], "an idle connection is closed at once")
        idle.close()
        XCTAssertThrowsError(try RawSocket(port: port), "the listener is closed")
        let download = try await client.value
        XCTAssertEqual(download.exit, 0)
        XCTAssertTrue(download.body == Data(bytes), "every byte")
        daemon.process.waitUntilExit()
        XCTAssertEqual(daemon.process.terminationStatus, 0, daemon.log)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: folder + "/cache/tmp"), [])

        let (again, port2) = try startProxyProcess(folder: folder, config: config)
        let hit = try curl("http://127.0.0.1:\(port2)/v2/a/blobs/\(FaultInjectionTests.digest(of: bytes))")
        XCTAssertTrue(hit.body == Data(bytes))
        XCTAssertEqual(upstream.gets.count, 1, "a hit after the restart")
        again.stop()
        await upstream.stop()
    }
}
