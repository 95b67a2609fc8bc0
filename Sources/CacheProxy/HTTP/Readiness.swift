import NIOConcurrencyHelpers

/// `/readyz` and the connections' keep-alive decisions read this; shutdown
/// flips it so a load balancer stops sending before the listener goes.
public final class Readiness: Sendable {
    private let ready = NIOLockedValueBox(true)
    public init() {}
    public var isReady: Bool { ready.withLockedValue { $0 } }
    public func drain() { ready.withLockedValue { $0 = false } }
}
