import CacheProxy
import Foundation
import XCTest

/// TLS on both sides, with certificates made for the test by openssl: the
/// listener (beside a plaintext one, reloaded on SIGHUP), and upstreams
/// that are the real registry serving TLS, with and without asking for a
/// client certificate.
final class TLSTests: XCTestCase {
    typealias F = FaultInjectionTests

    /// A Python `ssl` upstream: arguments port, certificate, key (then the
    /// test's own); `serve` defines `serve(raw)` for each accepted socket,
    /// run on a thread of its own, with `context` the server's TLS context.
    static func pythonTLSUpstream(serve: String) -> String {
        """
        import signal, socket, ssl, sys, threading, time
        # The test process may block SIGTERM; its children inherit that.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(sys.argv[2], sys.argv[3])
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(sys.argv[1])))
        listener.listen(8)
        \(serve)
        while True:
            raw, _ = listener.accept()
            threading.Thread(target=serve, args=(raw,), daemon=True).start()
        """
    }

    private func https(_ url: String, _ certificates: TestCertificates, _ extra: [String] = [])
        throws -> (exit: Int32, body: Data, code: Int) {
        try curl(url, ["--cacert", certificates.caCert] + extra)
    }

    func testTLSListenerBesidePlaintextServesMissesHitsAndRanges() async throws {
        let certificates = try TestCertificates.make()
        let registry = try Registry()
        let image = try TestImage.make(layerSizes: [4096, 3_000_000])
        try image.push(to: "\(registry.address)/team/app:v1")
        let proxy = try await TestProxy(
            upstreamsYAML: "  - {host: \"localhost\", registry: \"127.0.0.1\", port: \(registry.port), schema: http}",
            apiYAML: ", tls_cert: \"\(certificates.serverCert)\", tls_key: \"\(certificates.serverKey)\", tls_port: 2")
        defer { Task { await proxy.stop() } }
        let tlsPort = try XCTUnwrap(proxy.tlsPort)
        let base = "https://localhost:\(tlsPort)/v2/team/app/blobs/"
        for layer in image.layers {
            let miss = try https(base + layer, certificates)
            XCTAssertEqual(miss.code, 200)
            XCTAssertEqual(TestImage.digest(miss.body), layer, "a fill, over TLS")
            let hit = try https(base + layer, certificates)
            XCTAssertEqual(TestImage.digest(hit.body), layer, "a hit, over TLS")
            let range = try https(base + layer, certificates, ["-H", "Range: bytes=1000-2999"])
            XCTAssertEqual(range.code, 206)
            XCTAssertEqual(range.body, miss.body.subdata(in: 1000..<3000))
            XCTAssertEqual(registry.blobGets(layer), 1)
        }
        // The plaintext listener serves the same cache.
        let plain = try curl("http://localhost:\(proxy.port)/v2/team/app/blobs/\(image.layers[1])")
        XCTAssertEqual(TestImage.digest(plain.body), image.layers[1])
        // Plain HTTP on the TLS port is no request at all.
        XCTAssertNotEqual(try curl("http://localhost:\(tlsPort)/v2/").code, 200)
        // TLS 1.1 is refused. The client is told it may use TLS 1.1 (security
        // level 0), so only the server can be the one saying no.
        let (status, output) = try shell("openssl", [
            "s_client", "-connect", "127.0.0.1:\(tlsPort)", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
            "-CAfile", certificates.caCert])
        XCTAssertNotEqual(status, 0, output)
        let modern = try shell("openssl", ["s_client", "-connect", "127.0.0.1:\(tlsPort)", "-tls1_2",
                                           "-CAfile", certificates.caCert])
        XCTAssertEqual(modern.status, 0, modern.output)
    }

    /// A slow reader over TLS (the chunked read path, not sendfile) is
    /// served whole for longer than the send timeout while it keeps
    /// reading; one that stops reading is cut by it.
    func testSlowAndStalledReadersOverTLS() async throws {
        let certificates = try TestCertificates.make()
        let bytes = (0..<6_000_000).map { UInt8(truncatingIfNeeded: $0 &* 29) }
        let digest = TestImage.digest(Data(bytes))
        // Larger than what loopback's socket buffers hold for a client that
        // stopped reading, so the proxy really waits on it.
        let large = (0..<24_000_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let largeDigest = TestImage.digest(Data(large))
        let upstream = try await FakeUpstream { head in .init(body: head.uri.hasSuffix(digest) ? bytes : large) }
        let proxy = try await TestProxy(
            upstreamsYAML: localUpstreamYAML(upstream.port),
            extraYAML: "timeouts: {send: 1, idle: 1}",
            apiYAML: ", tls_cert: \"\(certificates.serverCert)\", tls_key: \"\(certificates.serverKey)\", tls_port: 2")
        defer { Task { await proxy.stop(); await upstream.stop() } }
        let url = "https://127.0.0.1:\(try XCTUnwrap(proxy.tlsPort))/v2/a/blobs/\(digest)"
        XCTAssertEqual(try https(url, certificates).code, 200)  // cached now

        let started = ContinuousClock.now
        let slow = try https(url, certificates, ["--limit-rate", "2M"])
        XCTAssertEqual(slow.exit, 0)
        XCTAssertEqual(TestImage.digest(slow.body), digest)
        XCTAssertGreaterThan(ContinuousClock.now - started, .seconds(2), "slower than the send timeout, and whole")

        // Asks, reads nothing: the send timeout cuts it (the proxy is not
        // left holding a descriptor and a read-ahead chunk).
        let largeURL = "https://127.0.0.1:\(try XCTUnwrap(proxy.tlsPort))/v2/a/blobs/\(largeDigest)"
        XCTAssertEqual(TestImage.digest(try https(largeURL, certificates).body), largeDigest)  // cached now
        // A TLS client with a 4 KiB receive buffer that reads the first
        // bytes of the answer, then nothing (Python's ssl module).
        let script = """
            import socket, ssl, sys, time
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", int(sys.argv[1])))
            t = ssl.create_default_context(cafile=sys.argv[2]).wrap_socket(s, server_hostname="127.0.0.1")
            t.sendall(("GET /v2/a/blobs/" + sys.argv[3] + " HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n").encode())
            t.recv(100)
            time.sleep(30)
            """
        let stalled = Process()
        stalled.executableURL = URL(fileURLWithPath: try which("python3"))
        stalled.arguments = ["-c", script, String(try XCTUnwrap(proxy.tlsPort)), certificates.caCert, largeDigest]
        let suspended = ContinuousClock.now
        try stalled.run()
        defer { stalled.terminate() }
        XCTAssertTrue(eventually(within: 8) { (try? proxy.metric("cacheproxy_client_timeouts_total{kind=\"send\"}")) ?? 0 >= 1 },
                      "cut by the send timeout")
        XCTAssertLessThan(ContinuousClock.now - suspended, .seconds(8))
    }

    func testSIGHUPReloadsTheCertificateWithoutDroppingConnections() async throws {
        let certificates = try TestCertificates.make()
        let bytes = (0..<4_000_000).map { UInt8(truncatingIfNeeded: $0 &* 11) }
        let digest = TestImage.digest(Data(bytes))
        let upstream = try await FakeUpstream { _ in .init(body: bytes, chunkSize: 100_000, delay: .milliseconds(60)) }
        defer { Task { await upstream.stop() } }
        let folder = try makeTemporaryFolder("tls-reload")
        let config = """
            upstreams:
            \(localUpstreamYAML(upstream.port))
            storage: {folder: "\(folder)/cache", io_backend: \(TestBackend.yaml)}
            """
        let (daemon, port) = try startProxyProcess(
            folder: folder, config: config,
            api: ", tls_cert: \"\(certificates.serverCert)\", tls_key: \"\(certificates.serverKey)\"")
        defer { daemon.stop() }
        func subject() throws -> String {
            let (_, output) = try shell("openssl", ["s_client", "-connect", "127.0.0.1:\(port)",
                                                    "-CAfile", certificates.caCert])
            return output
        }
        XCTAssertTrue(try subject().contains("CN=localhost") || subject().contains("CN = localhost"))

        // A download of ~2.5 s is running over TLS when the certificate changes.
        let download = Task.detached {
            try curl("https://127.0.0.1:\(port)/v2/a/blobs/\(digest)", ["--cacert", certificates.caCert])
        }
        try await Task.sleep(for: .milliseconds(500))
        try certificates.issue(name: "server", subject: "/CN=renewed",
                               extensions: "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
        kill(daemon.process.processIdentifier, SIGHUP)
        XCTAssertTrue(eventually { daemon.log.contains("TLS certificate reloaded") }, daemon.log)
        let renewed = try subject()
        XCTAssertTrue(renewed.contains("CN=renewed") || renewed.contains("CN = renewed"), renewed)
        let finished = try await download.value
        XCTAssertEqual(finished.exit, 0)
        XCTAssertEqual(TestImage.digest(finished.body), digest, "the connection open across the reload finished")

        // A broken renewal keeps the working certificate.
        try "not a key".write(toFile: certificates.serverKey, atomically: true, encoding: .utf8)
        kill(daemon.process.processIdentifier, SIGHUP)
        XCTAssertTrue(eventually { daemon.log.contains("reload failed") }, daemon.log)
        let still = try curl("https://127.0.0.1:\(port)/v2/a/blobs/\(digest)", ["--cacert", certificates.caCert])
        XCTAssertEqual(TestImage.digest(still.body), digest)
        XCTAssertTrue(daemon.process.isRunning)
    }

    /// The real registry serving TLS with a certificate from the test's CA.
    func testUpstreamTLSWithAPrivateCA() async throws {
        let certificates = try TestCertificates.make()
        let registry = try Registry(tls: certificates)
        let image = try TestImage.make(layerSizes: [50_000])
        try image.push(to: "\(registry.address)/team/app:v1")
        let layer = image.layers[0]
        func proxy(_ extra: String) async throws -> TestProxy {
            try await TestProxy(upstreamsYAML:
                "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: https\(extra)}",
                extraYAML: "timeouts: {connect: 1}")
        }

        let trusting = try await proxy(", ca_file: \"\(certificates.caCert)\"")
        let good = try curl("\(trusting.base)/v2/team/app/blobs/\(layer)")
        XCTAssertEqual(TestImage.digest(good.body), layer)
        XCTAssertEqual(try curl("\(trusting.base)/v2/team/app/manifests/v1",
                            ["-H", "Accept: application/vnd.oci.image.manifest.v1+json"]).code, 200)
        await trusting.stop()

        // The system's CAs do not know the test's: 502, an OCI error, no blob.
        let strict = try await proxy("")
        for path in ["blobs/\(layer)", "manifests/v1"] {
            let refused = try curl("\(strict.base)/v2/team/app/\(path)")
            XCTAssertEqual(refused.code, 502, path)
            XCTAssertTrue(String(decoding: refused.body, as: UTF8.self).contains(#""code":"UNAVAILABLE""#))
        }
        XCTAssertTrue(strict.files(in: "blobs").isEmpty)
        await strict.stop()

        let insecure = try await proxy(", insecure: true")
        XCTAssertEqual(TestImage.digest(try curl("\(insecure.base)/v2/team/app/blobs/\(layer)").body), layer)
        await insecure.stop()
    }

    /// A fill given up while its TLS upstream is still sending (its client
    /// left and another download waits for the slot) closes its connection
    /// at once. It does not first wait for the upstream's `close_notify`: in
    /// TLS 1.3 an upstream may go on sending after ours (Go's servers do,
    /// to the body's end), and that wait read everything that came for
    /// NIOSSL's 5 s shutdown timeout, past the fill bound. The upstream
    /// here (Python's `ssl`) writes an endless body and never reads again.
    func testAFillGivenUpOverTLSClosesItsConnectionAtOnce() async throws {
        let certificates = try TestCertificates.make()
        let port = try freePort()
        let script = Self.pythonTLSUpstream(serve: """
            def serve(raw):
                try:
                    conn = context.wrap_socket(raw, server_side=True)
                    head = b""
                    while b"\\r\\n\\r\\n" not in head:
                        head += conn.recv(4096)
                    path = head.split(b" ")[1].decode()
                    print("get", path, time.monotonic(), flush=True)
                    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 100000000000\\r\\n\\r\\n")
                    chunk = b"x" * 65536
                    while True:
                        conn.sendall(chunk)
                except Exception:
                    print("end", path, time.monotonic(), flush=True)
            """)
        let upstreamLog = try makeTemporaryFolder("endless") + "/log"
        let upstream = try Daemon("python3", ["-c", script, String(port), certificates.serverCert,
                                              certificates.serverKey], logPath: upstreamLog)
        defer { upstream.stop() }
        try waitForPort(port)
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(port), schema: https, ca_file: "\(certificates.caCert)", max_fills: 1}
            """, extraYAML: "timeouts: {upstream: 10, shutdown: 1}")
        let (first, second) = (String(repeating: "1", count: 64), String(repeating: "2", count: 64))
        // The first client leaves; its download goes on (a client could join).
        // (Bodies to /dev/null: the upstream's is endless, and fast.)
        _ = try shell("curl", ["-s", "-o", "/dev/null", "--max-time", "1", "\(proxy.base)/v2/a/blobs/sha256:\(first)"])
        // The second waits for the slot, which the unwanted download yields.
        let waiting = Task.detached {
            try shell("curl", ["-s", "-o", "/dev/null", "--max-time", "2", "\(proxy.base)/v2/a/blobs/sha256:\(second)"])
        }
        /// When the upstream saw `event` ("get", "end") for `digest`.
        func time(_ event: String, _ digest: String) -> Double? {
            for line in upstream.log.split(separator: "\n") {
                let fields = line.split(separator: " ")
                guard fields.count == 3, fields[0] == event, fields[1].hasSuffix(digest) else { continue }
                return Double(fields[2])
            }
            return nil
        }
        // Waited for without blocking a thread: the proxy runs in this process.
        for _ in 0..<500 where time("get", second) == nil || time("end", first) == nil {
            try await Task.sleep(for: .milliseconds(10))
        }
        XCTAssertNotNil(time("get", second), "the waiting download got the slot")
        XCTAssertNotNil(time("end", first), "the given-up connection was closed")
        if let asked = time("get", second), let ended = time("end", first) {
            XCTAssertLessThan(ended - asked, 1.5, "the given-up download's connection was read on after its slot went")
        }
        _ = try await waiting.value
        await proxy.stop()
    }

    /// A TLS upstream that pauses mid-body, on the fill's own connection:
    /// a pause shorter than `upstream_idle` is waited for (the blob whole,
    /// right and kept), a longer one cuts the fill at the idle timeout, not
    /// at the pause's end (the client's answer visibly short, nothing
    /// kept), and the next request fetches the blob whole. Python's `ssl`
    /// serves it: the first GET of each upstream pauses halfway.
    func testATLSUpstreamPausingMidBodyIsWaitedForBelowTheIdleTimeoutAndCutAbove() async throws {
        let certificates = try TestCertificates.make()
        let folder = try makeTemporaryFolder("tls-pause")
        let bytes = F.randomBytes(2_000_000)
        let digest = F.digest(of: bytes)
        try Data(bytes).write(to: URL(fileURLWithPath: folder + "/blob"))
        let script = Self.pythonTLSUpstream(serve: """
            body = open(sys.argv[4], "rb").read()
            pause = float(sys.argv[5])
            gets = [0]
            lock = threading.Lock()
            def serve(raw):
                try:
                    conn = context.wrap_socket(raw, server_side=True)
                    while True:
                        head = b""
                        while b"\\r\\n\\r\\n" not in head:
                            data = conn.recv(4096)
                            if not data:
                                return
                            head += data
                        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body))
                        if head.startswith(b"HEAD"):
                            continue
                        with lock:
                            gets[0] += 1
                            first = gets[0] == 1
                        conn.sendall(body[:len(body) // 2])
                        if first:
                            time.sleep(pause)
                        conn.sendall(body[len(body) // 2:])
                except Exception:
                    pass
            """)
        for (pause, cut) in [(0.4, false), (2.5, true)] {
            let port = try freePort()
            let upstream = try Daemon("python3", ["-c", script, String(port), certificates.serverCert,
                                                  certificates.serverKey, folder + "/blob", String(pause)],
                                      logPath: folder + "/log-\(port)")
            defer { upstream.stop() }
            try waitForPort(port)
            let proxy = try await TestProxy(upstreamsYAML: """
                  - {host: "127.0.0.1", registry: "127.0.0.1", port: \(port), schema: https, ca_file: "\(certificates.caCert)"}
                """, extraYAML: "timeouts: {upstream: 2, upstream_idle: 1, shutdown: 1}")
            let url = "\(proxy.base)/v2/a/blobs/\(digest)"
            let started = Date()
            let answer = try curl(url, ["--max-time", "10"])
            let took = Date().timeIntervalSince(started)
            if cut {
                XCTAssertTrue(answer.exit != 0 || answer.body.count < bytes.count, "visibly short, not whole-looking")
                XCTAssertLessThan(answer.body.count, bytes.count)
                XCTAssertLessThan(took, pause, "cut at the idle timeout, not at the pause's end")
                XCTAssertTrue(eventually { proxy.files(in: "blobs").isEmpty }, "nothing kept of a cut fill")
                let again = try curl(url, ["--max-time", "10"])
                XCTAssertEqual(again.exit, 0)
                XCTAssertEqual(again.code, 200)
                XCTAssertEqual(F.digest(of: [UInt8](again.body)), digest, "the next fill whole and right")
            } else {
                XCTAssertEqual(answer.exit, 0)
                XCTAssertEqual(answer.code, 200)
                XCTAssertEqual(F.digest(of: [UInt8](answer.body)), digest, "waited for, whole and right")
                XCTAssertGreaterThanOrEqual(took, pause)
                XCTAssertTrue(eventually { proxy.files(in: "blobs").count == 1 }, "kept")
            }
            await proxy.stop()
        }
    }

    /// Many fills from one TLS upstream (the real registry) at once, more
    /// than its fill slots: every layer asked by three clients at once, six
    /// layers, two slots. Each client gets its layer whole and right, each
    /// layer is fetched once (the waiting clients join its fill), and every
    /// layer is kept.
    func testManyFillsFromOneTLSUpstreamShareItsSlotsAndEachIsRight() async throws {
        let certificates = try TestCertificates.make()
        let registry = try Registry(tls: certificates)
        let image = try TestImage.make(layerSizes: [600_000, 800_000, 1_000_000, 1_200_000, 1_400_000, 1_600_000])
        try image.push(to: "\(registry.address)/team/app:v1")
        let proxy = try await TestProxy(upstreamsYAML: """
              - {host: "127.0.0.1", registry: "127.0.0.1", port: \(registry.port), schema: https, ca_file: "\(certificates.caCert)", max_fills: 2}
            """)
        let layers = image.layers.flatMap { Array(repeating: $0, count: 3) }
        let answers = try zip(layers, curlAtOnce(layers.map { "\(proxy.base)/v2/team/app/blobs/\($0)" })).map {
            ($0, $1.exit, $1.code, TestImage.digest($1.body))
        }
        XCTAssertEqual(answers.count, 18)
        for (layer, exit, code, digest) in answers {
            XCTAssertEqual(exit, 0, layer)
            XCTAssertEqual(code, 200, layer)
            XCTAssertEqual(digest, layer, "whole and right")
        }
        for layer in image.layers {
            XCTAssertEqual(registry.blobGets(layer), 1, "\(layer) fetched once")
        }
        XCTAssertTrue(eventually { proxy.files(in: "blobs").count == image.layers.count }, "every layer kept")
        await proxy.stop()
    }

    /// The real registry asking for a client certificate signed by the CA.
    func testUpstreamClientCertificate() async throws {
        let certificates = try TestCertificates.make()
        let registry = try Registry(tls: certificates, requireClientCertificate: true)
        let image = try TestImage.make(layerSizes: [50_000])
        try image.push(to: "\(registry.address)/team/app:v1", certificates: certificates.skopeoDir)
        let layer = image.layers[0]
        let upstream = "  - {host: \"127.0.0.1\", registry: \"127.0.0.1\", port: \(registry.port), schema: https, ca_file: \"\(certificates.caCert)\""

        let withCertificate = try await TestProxy(upstreamsYAML: upstream
            + ", client_cert: \"\(certificates.clientCert)\", client_key: \"\(certificates.clientKey)\"}")
        XCTAssertEqual(TestImage.digest(try curl("\(withCertificate.base)/v2/team/app/blobs/\(layer)").body), layer)
        await withCertificate.stop()

        let without = try await TestProxy(upstreamsYAML: upstream + "}")
        let refused = try curl("\(without.base)/v2/team/app/blobs/\(layer)")
        XCTAssertEqual(refused.code, 502)
        XCTAssertTrue(String(decoding: refused.body, as: UTF8.self).contains("UNAVAILABLE"))
        await without.stop()
    }

    func testListenerConfigErrorsNameTheKey() throws {
        let certificates = try TestCertificates.make()
        let cases: [(String, String)] = [
            ("tls_cert: \"\(certificates.serverCert)\"", "api.tls_key"),
            ("tls_cert: /nonexistent.pem, tls_key: /nonexistent.key", "api.tls_cert"),
            ("tls_port: 5443", "api.tls_port"),
        ]
        assertConfigErrors(cases.map { api, key in
            ("api: {port: 5000, \(api)}\nupstreams: [{host: a, registry: r}]\nstorage: {folder: /tmp/x}\n", key)
        })
    }
}
