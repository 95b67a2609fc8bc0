import NIOCore
import NIOHTTP1

/// The error codes of the OCI distribution spec this proxy itself answers
/// with. Errors from an upstream are passed through untouched.
public enum OCIErrorCode: String, Sendable {
    case nameUnknown = "NAME_UNKNOWN"
    case nameInvalid = "NAME_INVALID"
    case digestInvalid = "DIGEST_INVALID"
    case unavailable = "UNAVAILABLE"
    case timeout = "TIMEOUT"
    case tooLarge = "TOO_LARGE"
    case unsupported = "UNSUPPORTED"
    case unauthorized = "UNAUTHORIZED"
    case denied = "DENIED"
    case blobUnknown = "BLOB_UNKNOWN"
    case manifestUnknown = "MANIFEST_UNKNOWN"
}

/// An answer the proxy makes up itself: an OCI JSON error.
public struct OCIError: Error, Sendable {
    public let status: HTTPResponseStatus
    public let code: OCIErrorCode
    public let message: String

    public init(_ status: HTTPResponseStatus, _ code: OCIErrorCode, _ message: String) {
        self.status = status
        self.code = code
        self.message = message
    }

    /// The body of an upstream's refusal to let a client read a blob.
    static func refusal(_ status: HTTPResponseStatus, kind: ContentKind = .blob) -> OCIError {
        switch status {
        case .unauthorized: OCIError(status, .unauthorized, "authentication required")
        case .notFound where kind == .manifest:
            OCIError(status, .manifestUnknown, "manifest unknown to the upstream registry")
        case .notFound: OCIError(status, .blobUnknown, "blob unknown to the upstream registry")
        default: OCIError(status, .denied, "requested access to the resource is denied")
        }
    }

    public var body: String {
        #"{"errors":[{"code":"\#(code.rawValue)","message":"\#(Self.escape(message))","detail":null}]}"#
    }

    static func escape(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case _ where scalar.value < 0x20: out += " "
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out
    }
}
