import Crypto
import Foundation
import NIOConcurrencyHelpers
import NIOHTTP1

/// A token service for the real distribution registry's `auth: token`
/// mode, the way Docker Hub's works: Basic credentials in, an ES256 JWT out
/// whose `access` claim names what the user may do. The registry trusts the
/// signing certificate (`rootcertbundle`), sent along in the JWT's `x5c`.
final class TokenServer: Sendable {
    let fake: FakeUpstream
    let certificate: String
    static let service = "test-registry"
    static let issuer = "test-issuer"
    private let issuedCount = NIOLockedValueBox(0)
    var issued: Int { issuedCount.withLockedValue { $0 } }

    /// `users`: name ─► (password, repositories that user may pull and push).
    init(users: [String: (password: String, repositories: [String])]) async throws {
        let folder = try makeTemporaryFolder("token")
        let (key, cert) = (folder + "/token.key", folder + "/token.pem")
        let (status, output) = try shell("openssl", [
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=test token signer"])
        guard status == 0 else { throw TestError("openssl: \(output)") }
        certificate = cert
        let signer = try P256.Signing.PrivateKey(pemRepresentation: String(contentsOfFile: key, encoding: .utf8))
        let der = try String(contentsOfFile: cert, encoding: .utf8).split(separator: "\n")
            .filter { !$0.hasPrefix("-----") }.joined()
        let counter = issuedCount
        fake = try await FakeUpstream { head in
            guard head.uri.hasPrefix("/token") else { return .init(status: .notFound) }
            var user = ""
            if let basic = head.headers.first(name: "authorization"), basic.hasPrefix("Basic "),
               let decoded = Data(base64Encoded: String(basic.dropFirst(6))),
               let pair = String(data: decoded, encoding: .utf8), let colon = pair.firstIndex(of: ":") {
                let (name, password) = (String(pair[..<colon]), String(pair[pair.index(after: colon)...]))
                guard users[name]?.password == password else { return .init(status: .unauthorized) }
                user = name
            }
            // scope=repository:<name>:<actions>; anonymous gets a token with
            // no access at all, as Docker Hub gives for a private repository.
            var access: [[String: Any]] = []
            let query = head.uri.split(separator: "?", maxSplits: 1).last.map(String.init) ?? ""
            for pair in query.split(separator: "&") where pair.hasPrefix("scope=") {
                let scope = String(pair.dropFirst(6)).removingPercentEncoding ?? ""
                let parts = scope.split(separator: ":")
                guard parts.count == 3, parts[0] == "repository",
                      users[user]?.repositories.contains(String(parts[1])) == true else { continue }
                access.append(["type": "repository", "name": String(parts[1]),
                               "actions": parts[2].split(separator: ",").map(String.init)])
            }
            let now = Int(Date().timeIntervalSince1970)
            let claims: [String: Any] = ["iss": TokenServer.issuer, "sub": user, "aud": TokenServer.service,
                                         "exp": now + 300, "nbf": now - 10, "iat": now - 10,
                                         "jti": UUID().uuidString, "access": access]
            let header: [String: Any] = ["typ": "JWT", "alg": "ES256", "x5c": [der]]
            guard let token = try? TokenServer.sign(header: header, claims: claims, with: signer) else {
                return .init(status: .internalServerError)
            }
            counter.withLockedValue { $0 += 1 }
            return .init(headers: ["content-type": "application/json"],
                         body: Array(#"{"token":"\#(token)","expires_in":300}"#.utf8))
        }
    }

    var realm: String { "http://127.0.0.1:\(fake.port)/token" }

    /// A token the way a client gets one (curl to the realm).
    func token(user: String?, scope: String) throws -> String {
        var extra = ["-G", "--data-urlencode", "service=\(Self.service)", "--data-urlencode", "scope=\(scope)"]
        if let user { extra += ["-u", user] }
        let answer = try curl(realm, extra)
        guard answer.code == 200,
              let json = try JSONSerialization.jsonObject(with: answer.body) as? [String: Any],
              let token = json["token"] as? String else { throw TestError("no token: \(answer.code)") }
        return token
    }

    static func sign(header: [String: Any], claims: [String: Any], with key: P256.Signing.PrivateKey) throws -> String {
        func encode(_ object: [String: Any]) throws -> String {
            base64url(try JSONSerialization.data(withJSONObject: object))
        }
        let input = try encode(header) + "." + encode(claims)
        let signature = try key.signature(for: Data(input.utf8)).rawRepresentation
        return input + "." + base64url(signature)
    }

    static func base64url(_ data: Data) -> String {
        data.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }
}
