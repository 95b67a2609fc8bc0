#if canImport(Glibc)
import Glibc
#endif

/// The standard `process_*` metrics, read from `/proc/self` at scrape time
/// (swift-prometheus does not produce them on Linux).
enum ProcessMetrics {
    static let startTime: Double = {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }()

    static func exposition() -> String {
        _ = startTime
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
        var bytes = [UInt8](repeating: 0, count: 4096)
        let n = read(fd, &bytes, bytes.count)
        guard n > 0 else { return nil }
        return String(decoding: bytes[..<n], as: UTF8.self)
    }

    private static func countOpenFDs() -> Int {
        guard let dir = opendir("/proc/self/fd") else { return 0 }
        defer { closedir(dir) }
        var count = 0
        while readdir(dir) != nil { count += 1 }
        return max(0, count - 3)  // ".", ".." and the descriptor opendir holds
    }
}
