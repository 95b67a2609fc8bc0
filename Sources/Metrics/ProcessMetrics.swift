#if canImport(Glibc)
import Glibc
#endif

/// The standard `process_*` metrics, read from `/proc/self` at scrape time
/// (swift-prometheus does not produce them on Linux).
enum ProcessMetrics {
    /// When the process started, from the kernel (boot time plus the
    /// process's start in clock ticks), not from whenever this was first read.
    static let startTime: Double = {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        guard let stat = readFile("/proc/self/stat"), let close = stat.lastIndex(of: ")"),
              let procStat = readFile("/proc/stat"),
              let btimeLine = procStat.split(separator: "\n").first(where: { $0.hasPrefix("btime ") }),
              let bootTime = Double(btimeLine.dropFirst("btime ".count))
        else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // starttime is field 22 (1-based, as proc(5) numbers them).
        guard fields.count > 22 - 3, let started = Double(fields[22 - 3]) else { return 0 }
        return bootTime + started / ticks
    }()

    static func exposition() -> String {
        var out = ""
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let pageSize = Double(sysconf(Int32(_SC_PAGESIZE)))
        if let stat = readFile("/proc/self/stat"), let close = stat.lastIndex(of: ")") {
            // Fields after "pid (comm) ": state is field 3, utime 14, stime 15,
            // vsize 23, rss 24 (1-based, as proc(5) numbers them).
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            func field(_ n: Int) -> Double { fields.count > n - 3 ? Double(fields[n - 3]) ?? 0 : 0 }
            let cpu = (field(14) + field(15)) / ticks
            out += metric("process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds.", cpu)
            out += metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", field(23))
            out += metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", field(24) * pageSize)
        }
        out += metric("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", startTime)
        out += metric("process_open_fds", "gauge", "Number of open file descriptors.", Double(countOpenFDs()))
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            out += metric("process_max_fds", "gauge", "Maximum number of open file descriptors.", Double(limit.rlim_cur))
        }
        return out
    }

    private static func metric(_ name: String, _ type: String, _ help: String, _ value: Double) -> String {
        "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name) \(value)\n"
    }

    private static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        // /proc/stat grows with the number of CPUs: read to the end.
        var out: [UInt8] = []
        var bytes = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &bytes, bytes.count)
            guard n > 0 else { break }
            out.append(contentsOf: bytes[..<n])
        }
        return out.isEmpty ? nil : String(decoding: out, as: UTF8.self)
    }

    private static func countOpenFDs() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(dir) }
        var count = 0
        while readdir(dir) != nil { count += 1 }
        return max(0, count - 3)  // ".", ".." and the descriptor opendir holds
    }
}
