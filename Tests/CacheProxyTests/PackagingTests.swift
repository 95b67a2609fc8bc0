import Foundation
import XCTest
import Yams
@testable import CacheProxy

/// What operators install from: the systemd unit (checked by systemd's own
/// `systemd-analyze verify`), `make install`, the container file and the
/// Kubernetes manifests (parsed, and their configuration loaded by the
/// proxy's own loader).
final class PackagingTests: XCTestCase {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    func read(_ path: String) throws -> String {
        try String(contentsOfFile: root + "/" + path, encoding: .utf8)
    }

    func testTheSystemdUnitVerifiesAndOutlastsTheDrain() throws {
        let folder = try makeTemporaryFolder("unit")
        // systemd checks that ExecStart exists: point it at this build.
        let unit = try read("deploy/systemd/cache-proxy.service")
            .replacingOccurrences(of: "/usr/local/bin/cache-proxy", with: proxyBinary())
        try unit.write(toFile: folder + "/cache-proxy.service", atomically: true, encoding: .utf8)
        let (status, output) = try shell("systemd-analyze", ["verify", folder + "/cache-proxy.service"])
        XCTAssertEqual(status, 0, output)
        XCTAssertEqual(output.trimmingCharacters(in: .whitespacesAndNewlines), "", "no warnings: \(output)")
        for line in ["NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/cache-proxy",
                     "CapabilityBoundingSet=", "ExecReload=/bin/kill -HUP $MAINPID", "SystemCallFilter=@system-service @aio"] {
            XCTAssertTrue(unit.contains("\n" + line + "\n"), line)
        }
        let stop = unit.split(separator: "\n").first { $0.hasPrefix("TimeoutStopSec=") }.flatMap { Double($0.dropFirst(15)) }
        XCTAssertGreaterThan(stop ?? 0, ProxyConfig.Timeouts().shutdownSeconds, "systemd waits for the drain")
    }

    func testMakeInstallPutsEachFileInItsPlace() throws {
        let destination = try makeTemporaryFolder("install")
        let (status, output) = try shell("make", ["-C", root, "install", "DESTDIR=\(destination)", "PREFIX=/usr",
                                                  "BINARY=\(proxyBinary())"])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: destination + "/usr/bin/cache-proxy"))
        let unit = try String(contentsOfFile: destination + "/etc/systemd/system/cache-proxy.service", encoding: .utf8)
        XCTAssertTrue(unit.contains("ExecStart=/usr/bin/cache-proxy serve --config /etc/cache-proxy/config.yaml"), unit)
        let config = try ConfigLoader.load(path: destination + "/etc/cache-proxy/config.yaml")
        XCTAssertEqual(config.storage.folder, "/var/lib/cache-proxy", "the unit's state directory")
        XCTAssertTrue(FileManager.default.fileExists(atPath: destination + "/usr/share/doc/cache-proxy/operations.md"))
        // An operator's own configuration survives a reinstall.
        try "# mine\n".write(toFile: destination + "/etc/cache-proxy/config.yaml", atomically: true, encoding: .utf8)
        XCTAssertEqual(try shell("make", ["-C", root, "install", "DESTDIR=\(destination)", "PREFIX=/usr",
                                          "BINARY=\(proxyBinary())"]).status, 0)
        XCTAssertEqual(try String(contentsOfFile: destination + "/etc/cache-proxy/config.yaml", encoding: .utf8), "# mine\n")
    }

    func testTheKubernetesManifestsHoldTogether() throws {
        let documents = try Yams.load_all(yaml: read("deploy/kubernetes/cache-proxy.yaml")).compactMap { $0 as? [String: Any] }
        let byKind = Dictionary(documents.map { ($0["kind"] as? String ?? "", $0) }, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(Set(byKind.keys), ["ConfigMap", "Service", "StatefulSet"])
        let data = try XCTUnwrap((byKind["ConfigMap"]?["data"] as? [String: Any])?["config.yaml"] as? String)
        let config = try ConfigLoader.parse(yaml: data)
        let spec = try XCTUnwrap(byKind["StatefulSet"]?["spec"] as? [String: Any])
        let pod = try XCTUnwrap((spec["template"] as? [String: Any])?["spec"] as? [String: Any])
        let container = try XCTUnwrap((pod["containers"] as? [[String: Any]])?.first)
        let readiness = (container["readinessProbe"] as? [String: Any])?["httpGet"] as? [String: Any]
        XCTAssertEqual(readiness?["path"] as? String, "/readyz", "a draining pod leaves the Service")
        XCTAssertEqual(((container["livenessProbe"] as? [String: Any])?["httpGet"] as? [String: Any])?["path"] as? String,
                       "/healthz")
        let preStop = ((container["lifecycle"] as? [String: Any])?["preStop"] as? [String: Any])?["exec"] as? [String: Any]
        let pause = Double((preStop?["command"] as? [String])?.last ?? "") ?? 0
        let grace = Double(pod["terminationGracePeriodSeconds"] as? Int ?? 0)
        XCTAssertGreaterThan(grace, pause + config.timeouts.shutdownSeconds, "the drain ends before SIGKILL")
        let mounts = (container["volumeMounts"] as? [[String: Any]]) ?? []
        XCTAssertTrue(mounts.contains { $0["mountPath"] as? String == config.storage.folder }, "the cache is on the claim")
        let args = container["args"] as? [String] ?? []
        let configPath = args.last ?? ""
        XCTAssertTrue(mounts.contains { configPath.hasPrefix(($0["mountPath"] as? String ?? "-") + "/") }, "the config is mounted")
        let ports = (container["ports"] as? [[String: Any]])?.first?["containerPort"] as? Int
        XCTAssertEqual(ports, config.api.port)
        XCTAssertNotNil((spec["volumeClaimTemplates"] as? [[String: Any]])?.first, "a claim per replica for the cache")
        let hosts = try read("deploy/kubernetes/hosts.toml")
        XCTAssertTrue(hosts.contains(#"capabilities = ["pull", "resolve"]"#))
        XCTAssertTrue(hosts.contains(":\(config.api.port)\"]"))
    }

    func testTheContainerRunsAsAUserWithVolumesAndAHealthCheck() throws {
        let file = try read("deploy/container/Containerfile")
        let config = try ConfigLoader.parse(yaml: read("deploy/container/config.yaml"))
        let lines = file.split(separator: "\n").map(String.init).filter { !$0.hasPrefix("#") }
        XCTAssertEqual(lines.filter { $0.hasPrefix("FROM ") }.count, 2, "multi-stage")
        XCTAssertTrue(lines.contains("USER 10001"), "not root")
        XCTAssertTrue(lines.contains { $0.hasPrefix("VOLUME") && $0.contains("\"\(config.storage.folder)\"") })
        XCTAssertTrue(lines.contains { $0.hasPrefix("HEALTHCHECK") && $0.contains("127.0.0.1:\(config.api.port)/healthz") })
        XCTAssertTrue(lines.contains("STOPSIGNAL SIGTERM"))
    }
}
