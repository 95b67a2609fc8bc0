import Foundation
import NIOConcurrencyHelpers
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// Runs a command to completion (bounded by `timeout`) and returns its exit
/// status and combined output.
@discardableResult
func shell(_ command: String, _ arguments: [String], timeout: TimeInterval = 120,
         file: StaticString = #filePath, line: UInt = #line) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: try which(command))
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    process.standardInput = FileHandle.nullDevice  // nothing waits on the test's stdin
    try process.run()
    let deadline = Date().addingTimeInterval(timeout)
    let data = NIOLockedValueBox(Data())
    let reader = Thread {
        let all = pipe.fileHandleForReading.readDataToEndOfFile()
        data.withLockedValue { $0 = all }
    }
    reader.start()
    while process.isRunning, Date() < deadline { usleep(20_000) }
    if process.isRunning {
        process.terminate()
        XCTFail("\(command) did not finish within \(timeout) s", file: file, line: line)
    }
    process.waitUntilExit()
    while !reader.isFinished { usleep(1000) }
    return (process.terminationStatus, String(decoding: data.withLockedValue { $0 }, as: UTF8.self))
}

func which(_ command: String) throws -> String {
    if command.hasPrefix("/") { return command }
    for dir in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = "\(dir)/\(command)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    throw TestError("\(command) is not installed (make test installs it)")
}

struct TestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A long-running helper process (a registry, containerd), stopped on `stop`
/// or when the test object goes away.
final class Daemon: @unchecked Sendable {
    let process = Process()
    let logPath: String

    init(_ command: String, _ arguments: [String], logPath: String) throws {
        self.logPath = logPath
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        process.executableURL = URL(fileURLWithPath: try which(command))
        process.arguments = arguments
        process.standardOutput = log
        process.standardError = log
        try process.run()
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning, Date() < deadline { usleep(20_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit { stop() }
}

/// A TCP port nobody listens on right now.
func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { ptr -> Int32 in
            guard bind(fd, ptr, len) == 0 else { return -1 }
            return getsockname(fd, ptr, &len)
        }
    }
    guard bound == 0 else { throw TestError("cannot find a free port") }
    return Int(UInt16(bigEndian: addr.sin_port))
}

/// Waits until something accepts TCP connections on the port.
func waitForPort(_ port: Int, timeout: TimeInterval = 20) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if let socket = try? RawSocket(port: port) { socket.close(); return }
        usleep(50_000)
    }
    throw TestError("nothing listens on port \(port) after \(timeout) s")
}

func makeTemporaryFolder(_ name: String) throws -> String {
    let path = NSTemporaryDirectory() + "cache-proxy-test-\(name)-\(UUID().uuidString.prefix(8))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// One `curl` GET: exit status, body, HTTP status.
func curl(_ url: String, _ extra: [String] = []) throws -> (exit: Int32, body: Data, code: Int) {
    try curlAtOnce(url, count: 1, extra)[0]
}

/// `count` curl processes started together (so they really overlap, whatever
/// the test runner's thread pool), then waited for.
func curlAtOnce(_ url: String, count: Int, _ extra: [String] = []) throws -> [(exit: Int32, body: Data, code: Int)] {
    try curlAtOnce(Array(repeating: url, count: count), extra)
}

/// One curl process per URL, started together, then waited for, answers in
/// the URLs' order. (Not one task per curl: a curl waited for on a task
/// blocks a thread of the pool the in-process proxy needs.)
func curlAtOnce(_ urls: [String], _ extra: [String] = []) throws -> [(exit: Int32, body: Data, code: Int)] {
    let started = try urls.map { url -> (Process, String, Pipe) in
        let out = NSTemporaryDirectory() + "curl-\(UUID().uuidString)"
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try which("curl"))
        process.arguments = ["-s", "-o", out, "-w", "%{http_code}", "--max-time", "60"] + extra + [url]
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        return (process, out, pipe)
    }
    return started.map { process, out, pipe in
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        let body = (try? Data(contentsOf: URL(fileURLWithPath: out))) ?? Data()
        try? FileManager.default.removeItem(atPath: out)
        return (process.terminationStatus, body, Int(text.suffix(3)) ?? 0)
    }
}
