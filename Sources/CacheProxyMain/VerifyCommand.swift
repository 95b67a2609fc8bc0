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
        let listing = verifier.files()
        let total = max(1, listing.found.reduce(Int64(0)) { $0 + $1.size })
        var (done, doneBytes) = (0, Int64(0))
        var lastDraw = ContinuousClock.now
        let started = ContinuousClock.now
        let report = verifier.run(listing) { bytes, fileDone in
            doneBytes += bytes
            if fileDone { done += 1 }
            guard terminal, fileDone || lastDraw.duration(to: .now) > .milliseconds(100) else { return }
            lastDraw = .now
            let bar = ProgressBar.draw(Double(doneBytes) / Double(total))
            FileHandle.standardOutput.write(Data("\r\u{1B}[2K\(bar)  \(done)/\(listing.found.count) files".utf8))
        }
        if terminal { FileHandle.standardOutput.write(Data("\n".utf8)) }
        for damage in report.damaged {
            print("\(damage.removed ? "REMOVED" : "DAMAGED") \(damage.path): \(damage.problem)")
        }
        for problem in report.unreadable {
            print("UNREADABLE \(problem.path): \(problem.problem)")
        }
        let elapsed = started.duration(to: .now).inSeconds
        print("verified \(report.files) files (\(report.bytes) bytes) in \(String(format: "%.1f", elapsed)) s: "
              + "\(report.damaged.count) damaged\(dryRun || report.damaged.isEmpty || report.unremoved > 0 ? "" : " and removed"), "
              + "\(report.unreadable.count) unreadable")
        if !report.damaged.isEmpty || !report.unreadable.isEmpty { throw ExitCode(1) }
    }
}
