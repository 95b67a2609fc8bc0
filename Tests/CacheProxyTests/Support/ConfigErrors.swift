import CacheProxy
import XCTest

/// Each YAML text must fail to load with a `ConfigError` naming its key,
/// and the message must not contain `secret` (a password in the file).
func assertConfigErrors(_ cases: [(yaml: String, key: String)], secret: String? = nil,
                        file: StaticString = #filePath, line: UInt = #line) {
    for (yaml, key) in cases {
        XCTAssertThrowsError(try ConfigLoader.parse(yaml: yaml), yaml, file: file, line: line) { error in
            XCTAssertEqual((error as? ConfigError)?.key, key, "\(yaml) ─► \(error)", file: file, line: line)
            if let secret { XCTAssertFalse("\(error)".contains(secret), "no secret in the message", file: file, line: line) }
        }
    }
}
