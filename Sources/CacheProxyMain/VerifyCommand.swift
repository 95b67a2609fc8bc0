import ArgumentParser
import CacheProxy
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `cache-proxy verify --config PATH [--dry-run]`: checks every cached blob
/// and manifest against its digest (after a power loss with `fsync: false`,
/// say) and removes the damaged ones. Exit status 1 when it found damage.
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Re-hash every cached blob and manifest; remove those that do not match their digest.",
        discussion: "Safe while a server runs on the folder: damaged files are removed, and fetched again on the next pull.")

    @Option(help: "Path of the YAML configuration file.")
    var config: String = "./config.yaml"

    @Flag(name: .customLong("dry-run"), help: "Only report what is damaged; remove nothing.")
    var dryRun = false

    func run() throws {
        let settings: ProxyConfig
        do {
            settings = try ConfigLoader.load(path: config)
        } catch let error as ConfigError {
            printError(error.description)
            throw ExitCode(2)
        }
        let verifier = BlobVerifier(folder: settings.storage.folder, remove: !dryRun)
        let terminal = isatty(STDOUT_FILENO) == 1
        let files = verifier.files().found
        let total = max(1, files.reduce(Int64(0)) { $0 + $1.size })
        var (done, doneBytes) = (0, Int64(0))
        var lastDraw = ContinuousClock.now
        let started = ContinuousClock.now
        let report = verifier.run { bytes, fileDone in
            doneBytes += bytes
            if fileDone { done += 1 }
            guard terminal, fileDone || lastDraw.duration(to: .now) > .milliseconds(100) else { return }
            lastDraw = .now
            // Files published meanwhile may carry the count past the
            // first listing's: the bar stops at full.
            let fraction = min(1, Double(doneBytes) / Double(total))
            let filled = Int(fraction * 30)
            let bar = String(repeating: "=", count: filled) + String(repeating: " ", count: 30 - filled)
            FileHandle.standardOutput.write(Data("\r\u{1B}[2K[\(bar)] \(Int(fraction * 100))%  \(done)/\(files.count) files".utf8))
        }
        if terminal { FileHandle.standardOutput.write(Data("\n".utf8)) }
        for damage in report.damaged {
            print("\(dryRun || damage.problem.contains("NOT removed") ? "DAMAGED" : "REMOVED") \(damage.path): \(damage.problem)")
        }
        for problem in report.unreadable {
            print("UNREADABLE \(problem.path): \(problem.problem)")
        }
        let seconds = started.duration(to: .now)
        let elapsed = Double(seconds.components.seconds) + Double(seconds.components.attoseconds) / 1e18
        print("verified \(report.files) files (\(report.bytes) bytes) in \(String(format: "%.1f", elapsed)) s: "
              + "\(report.damaged.count) damaged\(dryRun || report.damaged.isEmpty || report.unremoved > 0 ? "" : " and removed"), "
              + "\(report.unreadable.count) unreadable")
        if !report.damaged.isEmpty || !report.unreadable.isEmpty { throw ExitCode(1) }
    }
}
