internal import CURing
#if canImport(Glibc)
import Glibc
#endif

/// Extended attributes (`<sys/xattr.h>`), which Swift's Glibc module does
/// not export; here because this module is the one with a C shim of its own.
public enum FileAttributes {
    /// 0, or the errno.
    public static func set(_ name: String, to value: String, on fd: Int32) -> Int32 {
        let result = value.withCString { fsetxattr(fd, name, $0, strlen($0), 0) }
        return result == 0 ? 0 : errno
    }

    /// The attribute's value, or nil when the file has none (or the file
    /// system keeps none).
    public static func get(_ name: String, of path: String) -> String? {
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = getxattr(path, name, &buffer, buffer.count)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }

    /// The attribute's value on an open file (at most 255 bytes), or nil.
    public static func get(_ name: String, fd: Int32) -> String? {
        var buffer = [UInt8](repeating: 0, count: 255)
        let n = fgetxattr(fd, name, &buffer, buffer.count)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n], as: UTF8.self)
    }
}
