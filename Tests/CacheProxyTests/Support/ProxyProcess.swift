import Foundation

private final class BundleMarker {}

/// The `cache-proxy` executable next to the test bundle. The products folder
/// (.build/<triple>/<config>/) holds both; Linux and macOS name the bundle's
/// URL differently, so look in both places.
func proxyBinary() -> String {
    let bundle = Bundle(for: BundleMarker.self).bundleURL
    let candidates = [bundle, bundle.deletingLastPathComponent()].map { $0.appendingPathComponent("cache-proxy").path }
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
}

/// The proxy as a real process on a free port, with `config` (YAML after
/// the `api:` line) written to `folder/c.yaml`.
func startProxyProcess(folder: String, config: String, arguments: [String] = [],
                       command: [String] = [], api: String = "", binary: String = proxyBinary()) throws
    -> (daemon: Daemon, port: Int) {
    let port = try freePort()
    try "api: {hostname: \"127.0.0.1\", port: \(port)\(api)}\n\(config)"
        .write(toFile: folder + "/c.yaml", atomically: true, encoding: .utf8)
    let argv = command + [binary, "--config", folder + "/c.yaml"] + arguments
    let daemon = try Daemon(argv[0], Array(argv.dropFirst()), logPath: folder + "/log-\(port)")
    try waitForPort(port)
    return (daemon, port)
}

/// The project's scripts folder (seccomp wrapper, ...).
func scriptPath(_ name: String) -> String {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("scripts/\(name)").path
}
