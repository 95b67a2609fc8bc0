import Logging
import NIOConcurrencyHelpers
import NIOSSL

/// The listener's certificate and key (`api.tls_cert`, `api.tls_key`), and
/// the TLS context new connections are handed.
///
/// `reload()` (SIGHUP) reads both files again and swaps the context in one
/// step: connections already open keep the session they negotiated, new
/// ones get the new certificate, and nothing is dropped. A renewal that
/// fails to load (a key that does not match, a half-written file) keeps the
/// old context and says why, so a bad deploy cannot take the listener down.
public final class ServerTLS: Sendable {
    let certificatePath: String
    let keyPath: String
    private let context: NIOLockedValueBox<NIOSSLContext>

    init(certificate: String, key: String) throws {
        self.certificatePath = certificate
        self.keyPath = key
        self.context = NIOLockedValueBox(try Self.load(certificate: certificate, key: key))
    }

    var current: NIOSSLContext { context.withLockedValue { $0 } }

    /// Reads the files again; on failure the current context stays.
    public func reload() throws {
        let fresh = try Self.load(certificate: certificatePath, key: keyPath)
        context.withLockedValue { $0 = fresh }
    }

    /// TLS 1.2 and 1.3 with BoringSSL's default ciphers; HTTP/1.1 offered by
    /// ALPN (the proxy speaks nothing else).
    static func load(certificate: String, key: String) throws -> NIOSSLContext {
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
            guard !chain.isEmpty else { throw ConfigError(key: "api.tls_cert", problem: "no certificate in \(certificate)") }
        } catch let error as ConfigError {
            throw error
        } catch {
            throw ConfigError(key: "api.tls_cert", problem: "not a PEM certificate chain (\(error))")
        }
        let privateKey: NIOSSLPrivateKey
        do {
            privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
        } catch {
            throw ConfigError(key: "api.tls_key", problem: "not a PEM private key")
        }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        configuration.minimumTLSVersion = .tlsv12
        configuration.applicationProtocols = ["http/1.1"]
        do {
            return try NIOSSLContext(configuration: configuration)
        } catch {
            throw ConfigError(key: "api.tls_key", problem: "does not match api.tls_cert (\(error))")
        }
    }
}
