import Crypto
import Foundation

/// The real CNCF distribution registry (Debian's `docker-registry`), on a
/// free loopback port with its own storage folder.
final class Registry: @unchecked Sendable {
    let port: Int
    let folder: String
    /// Users and passwords of an htpasswd-protected registry.
    let users: [String: String]
    let tls: TestCertificates?
    /// Whether the registry asks clients for a certificate signed by the CA.
    let requireClientCertificate: Bool
    private var daemon: Daemon?

    /// A token service the registry sends clients to (`auth: token`).
    let tokens: TokenServer?

    init(users: [String: String] = [:], tls: TestCertificates? = nil, requireClientCertificate: Bool = false,
         tokens: TokenServer? = nil) throws {
        port = try freePort()
        folder = try makeTemporaryFolder("registry")
        self.users = users
        self.tokens = tokens
        self.tls = tls
        self.requireClientCertificate = requireClientCertificate
        try start()
    }

    var address: String { "127.0.0.1:\(port)" }

    func start() throws {
        var auth = ""
        if !users.isEmpty {
            for (index, (user, password)) in users.sorted(by: { $0.key < $1.key }).enumerated() {
                let (status, output) = try shell("htpasswd", ["-B", "-b", index == 0 ? "-c" : "",
                                                              folder + "/htpasswd", user, password].filter { !$0.isEmpty })
                guard status == 0 else { throw TestError("htpasswd failed: \(output)") }
            }
            auth = "auth: {htpasswd: {realm: test-realm, path: \(folder)/htpasswd}}"
        }
        if let tokens {
            auth = "auth: {token: {realm: \"\(tokens.realm)\", service: \(TokenServer.service), "
                + "issuer: \(TokenServer.issuer), rootcertbundle: \(tokens.certificate)}}"
        }
        var tlsYAML = ""
        if let tls {
            tlsYAML = ", tls: {certificate: \(tls.serverCert), key: \(tls.serverKey)"
                + (requireClientCertificate ? ", clientcas: [\(tls.caCert)]" : "") + "}"
        }
        let config = """
            version: 0.1
            log: {level: warn, accesslog: {disabled: false}}
            storage:
              filesystem: {rootdirectory: \(folder)/data}
              delete: {enabled: true}
            http: {addr: "127.0.0.1:\(port)", secret: "test-secret"\(tlsYAML)}
            \(auth)
            """
        try config.write(toFile: folder + "/config.yml", atomically: true, encoding: .utf8)
        daemon = try Daemon("docker-registry", ["serve", folder + "/config.yml"], logPath: folder + "/log")
        try waitForPort(port)
    }

    func stop() {
        daemon?.stop()
        daemon = nil
    }

    /// GETs of this blob that reached the registry, from its access log.
    func blobGets(_ digest: String) -> Int {
        (daemon?.log ?? "").split(separator: "\n").filter { $0.contains("\"GET ") && $0.contains("/blobs/\(digest)") }.count
    }

    /// Requests with this method whose path holds `fragment` that reached
    /// the registry, from its access log (written after each response).
    func requests(_ method: String, _ fragment: String) -> Int {
        (daemon?.log ?? "").split(separator: "\n").filter { $0.contains("\"\(method) ") && $0.contains(fragment) }.count
    }

    deinit { stop() }
}

/// A small OCI image layout made on the spot: random layers (clients that
/// copy or fetch do not unpack them), a config and a manifest.
struct TestImage {
    let layout: String
    let tag: String
    let layers: [String]
    let config: String
    let manifest: String

    static func digest(_ data: Data) -> String {
        "sha256:" + SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
    }

    static func make(tag: String = "v1", layerSizes: [Int] = [4096, 1_500_000, 120_000]) throws -> TestImage {
        let layout = try makeTemporaryFolder("image")
        try FileManager.default.createDirectory(atPath: layout + "/blobs/sha256", withIntermediateDirectories: true)
        func write(_ data: Data) throws -> (digest: String, size: Int) {
            let hex = SHA256.hash(data: data).map { String(format: "%02x", $0) }.joined()
            try data.write(to: URL(fileURLWithPath: "\(layout)/blobs/sha256/\(hex)"))
            return ("sha256:" + hex, data.count)
        }
        var generator = SystemRandomNumberGenerator()
        let layers = try layerSizes.map { size in
            try write(Data((0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) }))
        }
        let layerJSON = layers.map {
            #"{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"\#($0.digest)","size":\#($0.size)}"#
        }
        let diffIDs = layers.map { "\"\($0.digest)\"" }.joined(separator: ",")
        let config = try write(Data(#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[\#(diffIDs)]}}"#.utf8))
        let manifest = try write(Data("""
            {"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",\
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"\(config.digest)","size":\(config.size)},\
            "layers":[\(layerJSON.joined(separator: ","))]}
            """.utf8))
        let index = """
            {"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",\
            "digest":"\(manifest.digest)","size":\(manifest.size),"annotations":{"org.opencontainers.image.ref.name":"\(tag)"}}]}
            """
        try index.write(toFile: layout + "/index.json", atomically: true, encoding: .utf8)
        try #"{"imageLayoutVersion":"1.0.0"}"#.write(toFile: layout + "/oci-layout", atomically: true, encoding: .utf8)
        return TestImage(layout: layout, tag: tag, layers: layers.map(\.digest), config: config.digest, manifest: manifest.digest)
    }

    /// `skopeo copy` from this layout to `docker://<destination>`.
    func push(to destination: String, credentials: String? = nil, certificates: String? = nil) throws {
        var arguments = ["copy", "--dest-tls-verify=false", "--preserve-digests"]
        if let credentials { arguments += ["--dest-creds", credentials] }
        if let certificates { arguments += ["--dest-cert-dir", certificates] }
        let (status, output) = try shell("skopeo", arguments + ["oci:\(layout):\(tag)", "docker://\(destination)"])
        guard status == 0 else { throw TestError("skopeo push failed: \(output)") }
    }
}
