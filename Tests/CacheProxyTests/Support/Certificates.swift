import Foundation

/// A private CA with a server certificate (for 127.0.0.1 and localhost) and
/// a client certificate, made with openssl for one test.
struct TestCertificates {
    let folder: String
    var caCert: String { folder + "/ca.pem" }
    var caKey: String { folder + "/ca.key" }
    var serverCert: String { folder + "/server.pem" }
    var serverKey: String { folder + "/server.key" }
    var clientCert: String { folder + "/client.pem" }
    var clientKey: String { folder + "/client.key" }
    /// The layout skopeo's `--cert-dir` reads (ca.crt, client.cert, client.key).
    var skopeoDir: String { folder + "/skopeo" }

    static func make() throws -> TestCertificates {
        let certificates = TestCertificates(folder: try makeTemporaryFolder("certs"))
        try certificates.run(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                              "-keyout", certificates.caKey, "-out", certificates.caCert, "-days", "2",
                              "-subj", "/CN=cache-proxy test CA"])
        try certificates.issue(name: "server", subject: "/CN=localhost",
                               extensions: "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
        try certificates.issue(name: "client", subject: "/CN=cache-proxy",
                               extensions: "extendedKeyUsage=clientAuth")
        let dir = certificates.skopeoDir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: certificates.caCert, toPath: dir + "/ca.crt")
        try FileManager.default.copyItem(atPath: certificates.clientCert, toPath: dir + "/client.cert")
        try FileManager.default.copyItem(atPath: certificates.clientKey, toPath: dir + "/client.key")
        return certificates
    }

    /// A new key and certificate `name`.pem / `name`.key signed by the CA
    /// (`name` may be new: a second server certificate for a reload).
    func issue(name: String, subject: String, extensions: String) throws {
        let (key, cert, csr, ext) = ("\(folder)/\(name).key", "\(folder)/\(name).pem", "\(folder)/\(name).csr",
                                     "\(folder)/\(name).ext")
        try extensions.write(toFile: ext, atomically: true, encoding: .utf8)
        try run(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
                 "-out", csr, "-subj", subject])
        try run(["x509", "-req", "-in", csr, "-CA", caCert, "-CAkey", caKey, "-CAcreateserial", "-out", cert,
                 "-days", "2", "-extfile", ext])
    }

    private func run(_ arguments: [String]) throws {
        let (status, output) = try shell("openssl", arguments)
        guard status == 0 else { throw TestError("openssl \(arguments[0]) failed: \(output)") }
    }
}
