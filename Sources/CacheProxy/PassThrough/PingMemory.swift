import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1

/// The upstream's last answers to the `/v2/` ping, which every client sends
/// before anything else: while the upstream cannot be reached, the ping is
/// answered from here, so a client gets on to the manifests the offline
/// memory serves (skopeo gives up at the ping otherwise).
///
/// Two answers are kept per upstream, because a ping's answer depends on
/// who asks: the challenge (a 401's `WWW-Authenticate`), which makes a
/// Basic-auth client send its credentials, and whether a client ever got a
/// 200. Offline, a client without `Authorization` gets the challenge when
/// one was seen, and everyone else a 200; what it may then read is the
/// offline memory's to decide, per credential and repository.
public final class PingMemory: Sendable {
    struct Row: Equatable, Sendable {
        let upstream: String
        /// A 200 was seen.
        var open = false
        /// The `WWW-Authenticate` of the last 401.
        var challenge: String?
    }

    private struct State {
        var rows: [String: Row] = [:]
        var changed = false
    }

    private let state: NIOLockedValueBox<State>

    init(remembered: [Row] = []) {
        var state = State()
        for row in remembered { state.rows[row.upstream] = row }
        self.state = NIOLockedValueBox(state)
    }

    /// Whether a challenge is safe to send back as a header: visible ASCII
    /// and spaces only (it comes from the upstream, or from the folder).
    static func isValidChallenge(_ text: String) -> Bool {
        !text.isEmpty && text.utf8.count <= 4096 && text.utf8.allSatisfy { $0 >= 0x20 && $0 < 0x7f }
    }

    /// The upstream answered a ping.
    func record(upstream: String, status: HTTPResponseStatus, headers: HTTPHeaders) {
        state.withLockedValue { state in
            var row = state.rows[upstream] ?? Row(upstream: upstream)
            switch status.code {
            case 200..<300:
                row.open = true
            case 401:
                let challenge = headers["www-authenticate"].joined(separator: ", ")
                guard Self.isValidChallenge(challenge) else { return }
                row.challenge = challenge
            default:
                return
            }
            if state.rows[upstream] != row {
                state.rows[upstream] = row
                state.changed = true
            }
        }
    }

    /// The remembered answer for a client that sends `headers`, or nil
    /// when the upstream was never heard from.
    func answer(upstream: String, headers: HTTPHeaders) -> (HTTPResponseStatus, HTTPHeaders, ByteBuffer)? {
        guard let row = state.withLockedValue({ $0.rows[upstream] }) else { return nil }
        var out: HTTPHeaders = ["content-type": "application/json",
                                "docker-distribution-api-version": "registry/2.0"]
        if let challenge = row.challenge, !headers.contains(name: "authorization") || !row.open {
            out.add(name: "www-authenticate", value: challenge)
            return (.unauthorized, out, ByteBuffer(string: OCIError(.unauthorized, .unauthorized,
                                                                     "authentication required").body))
        }
        guard row.open else { return nil }
        return (.ok, out, ByteBuffer(string: "{}"))
    }

    /// Forgets an upstream that now points elsewhere.
    func forget(upstream host: String) {
        state.withLockedValue { state in
            if state.rows.removeValue(forKey: host) != nil { state.changed = true }
        }
    }

    func snapshot(always: Bool = false) -> [Row]? {
        state.withLockedValue { state in
            guard state.changed || always else { return nil }
            state.changed = false
            return Array(state.rows.values)
        }
    }

    func markChanged() {
        state.withLockedValue { $0.changed = true }
    }
}
