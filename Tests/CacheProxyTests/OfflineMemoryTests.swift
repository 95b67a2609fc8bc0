import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import XCTest
@testable import CacheProxy

/// What the upstream allowed before survives a restart: an edge node that
/// reboots during an outage serves it still, and so does a copy of its
/// cache folder on another machine. Credentials never reach the disk.
final class OfflineMemoryTests: XCTestCase {
    typealias F = FaultInjectionTests

    func testARestartDuringAnOutageServesWhatWasAllowedBefore() async throws {
        let blob = F.randomBytes(100_000)
        let digest = F.digest(of: blob)
        let good = "Basic Z29vZDp1c2Vy"
        let down = NIOLockedValueBox(false)
        let upstream = try await FakeUpstream { head in
            if down.withLockedValue({ $0 }) { return .init(status: .serviceUnavailable) }
            guard head.headers.first(name: "authorization") == good else {
                return .init(status: .unauthorized, headers: ["www-authenticate": #"Basic realm="r""#])
            }
            return .init(body: blob)
        }
        let yaml = { (offline: String) in
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(upstream.port), schema: \"http\", offline: \(offline)}"
        }
        let folder = try makeTemporaryFolder("offline")
        let url = "/v2/corp/app/blobs/\(digest)"

        let first = try await TestProxy(upstreamsYAML: yaml("serve"), folder: folder)
        XCTAssertEqual(try curl(first.base + url, ["-H", "Authorization: \(good)"]).body, Data(blob))
        await first.stop()
        let attributes = try FileManager.default.attributesOfItem(atPath: folder + "/offline/key")
        XCTAssertEqual((attributes[.posixPermissions] as? NSNumber)?.intValue, 0o600, "the key is the owner's alone")
        let memory = try String(contentsOfFile: folder + "/offline/memory", encoding: .utf8)
        XCTAssertTrue(memory.contains("corp/app"), memory)
        XCTAssertFalse(memory.contains("Z29vZDp1c2Vy") || memory.contains("good"), "a credential reached the disk")

        // The upstream goes down, and the proxy restarts during the outage.
        down.withLockedValue { $0 = true }
        let restarted = try await TestProxy(upstreamsYAML: yaml("serve"), folder: folder)
        XCTAssertEqual(try curl(restarted.base + url, ["-H", "Authorization: \(good)"]).body, Data(blob),
                       "what was allowed before the restart is served")
        XCTAssertEqual(try restarted.metric(#"cacheproxy_access_checks_total{result="offline_served"}"#), 1)
        XCTAssertEqual(try curl(restarted.base + url, ["-H", "Authorization: Basic b3RoZXI6dXNlcg=="]).code, 502,
                       "another credential was never allowed")
        XCTAssertEqual(try curl(restarted.base + url).code, 502, "nor an anonymous client")
        await restarted.stop()

        // The same Host pointed at another registry (here: nothing on port
        // 1): what the old one allowed counts for nothing.
        let repointed = try await TestProxy(upstreamsYAML:
            "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: 1, schema: \"http\"}", folder: folder,
            extraYAML: "timeouts: {connect: 0.5}")
        XCTAssertEqual(try curl(repointed.base + url, ["-H", "Authorization: \(good)"]).code, 502)
        await repointed.stop()
        // (Its tables never held the old lines; the copy below is given the
        // first run's memory, whatever this run left.)

        // The folder copied elsewhere serves there; `offline: deny` does not.
        let copy = try makeTemporaryFolder("offline-copy") + "/cache"
        XCTAssertEqual(try shell("cp", ["-a", folder, copy]).status, 0)
        try memory.write(toFile: copy + "/offline/memory", atomically: true, encoding: .utf8)
        let elsewhere = try await TestProxy(upstreamsYAML: yaml("serve"), folder: copy)
        XCTAssertEqual(try curl(elsewhere.base + url, ["-H", "Authorization: \(good)"]).body, Data(blob))
        await elsewhere.stop()
        let denying = try await TestProxy(upstreamsYAML: yaml("deny"), folder: copy)
        XCTAssertEqual(try curl(denying.base + url, ["-H", "Authorization: \(good)"]).code, 502)
        await denying.stop()
        await upstream.stop()
    }

    /// Written while serving, not only at a clean stop: a `kill -9` loses
    /// at most one interval (5 s) of the upstream's answers.
    func testTheMemoryIsWrittenWhileServingSoAKillLosesLittle() async throws {
        let blob = F.randomBytes(20_000)
        let upstream = try await FakeUpstream { _ in .init(body: blob) }
        let folder = try makeTemporaryFolder("offline-kill")
        let (daemon, port) = try startProxyProcess(folder: folder, config: """
            upstreams: [{host: "127.0.0.1", registry: "127.0.0.1", port: \(upstream.port), schema: "http"}]
            storage: {folder: "\(folder)/cache"}
            """)
        XCTAssertEqual(try curl("http://127.0.0.1:\(port)/v2/team/app/blobs/\(F.digest(of: blob))").body, Data(blob))
        let written = eventually(within: 8) {
            ((try? String(contentsOfFile: folder + "/cache/offline/memory", encoding: .utf8)) ?? "").contains("team/app")
        }
        kill(daemon.process.processIdentifier, SIGKILL)
        daemon.process.waitUntilExit()
        XCTAssertTrue(written, "nothing written while serving")
        await upstream.stop()
    }

    /// A memory file that is damaged or from elsewhere costs what it held,
    /// never the start; a key of the wrong size is replaced.
    func testADamagedMemoryIsIgnoredLineByLine() throws {
        let folder = try makeTemporaryFolder("offline-damaged")
        try FileManager.default.createDirectory(atPath: folder + "/offline", withIntermediateDirectories: true)
        let digest = "sha256:" + String(repeating: "a", count: 64)
        let up = ProxyConfig.Upstream(host: "up", registry: "r", port: 443, schema: "https", aliases: [])
        let gone = ProxyConfig.Upstream(host: "gone", registry: "r", port: 443, schema: "https", aliases: [])
        try """
            \(AccessMemory.header)
            u up \(AccessMemory.fingerprint(up))
            u gone 0123
            g gone 1f 2e repo
            l gone repo \(digest)
            g up 1f 2e ../repo
            g up 1f 2e repo
            g up zz 2e repo
            l up repo \(digest)
            l up repo sha256:short
            x what is this
            g too few
            """.write(toFile: folder + "/offline/memory", atomically: true, encoding: .utf8)
        let loaded = AccessMemory.load(storage: folder, capacity: 10, upstreams: [up, gone])
        XCTAssertEqual(loaded.grants.map(\.repository), ["repo"])
        XCTAssertEqual(loaded.grants.first?.credential, AccessGate.CredentialHash(high: 0x1f, low: 0x2e))
        XCTAssertEqual(loaded.links.map(\.digest.description), [digest])
        XCTAssertEqual(AccessMemory.load(storage: folder, capacity: 0, upstreams: [up, gone]), AccessMemory.Snapshot())
        try "other format\ng up 1 2 repo\n".write(toFile: folder + "/offline/memory", atomically: true, encoding: .utf8)
        XCTAssertEqual(AccessMemory.load(storage: folder, capacity: 10, upstreams: [up, gone]), AccessMemory.Snapshot())
        // Saved and loaded back alike.
        try AccessMemory.save(loaded, storage: folder, upstreams: [up, gone])
        XCTAssertEqual(AccessMemory.load(storage: folder, capacity: 10, upstreams: [up, gone]), loaded)
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: folder + "/offline/key"))
        let (_, isNew) = try AccessMemory.key(storage: folder, logger: .init(label: "test"))
        XCTAssertTrue(isNew)
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: folder + "/offline/key")).count, 32)
    }
}
