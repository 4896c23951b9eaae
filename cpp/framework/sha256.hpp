// SHA-256 (FIPS 180-4) of a byte string, for the provenance of the files a C++ module reads at
// initialize (ECLUnpacker's conditions file): the digest of the bytes it parsed, not of a second
// read of the file, which may have changed in between. Python's hashlib gives the same hex digest.
#pragma once
#include <sys/stat.h>

#include <cstddef>
#include <map>
#include <string>

namespace fw {

// Lower-case hex, 64 characters (hashlib.sha256(data).hexdigest()).
std::string sha256_hex(const void* data, std::size_t size);
inline std::string sha256_hex(const std::string& bytes) { return sha256_hex(bytes.data(), bytes.size()); }

// A file's entry in a module's provenance (Module::provenance): {"path": its absolute, normalised path, "sha256":
// the digest of the bytes the module read}. ECLUnpacker's conditions file, ECLLeakageCorrection's own table.
std::map<std::string, std::string> file_provenance(const std::string& path, std::string sha256);

// The bytes hashed into a large file's identity from each end (large_file_identity).
constexpr std::size_t kHeadTailBytes = std::size_t(64) << 10;

// A cheap identity of a file too large to digest at start-up (RawFileInput's raw file: the whole file's SHA-256,
// ~316 MB/s, would add seconds per GB), read from the open descriptor fd (the file the module reads, not a second
// open of the name) and its fstat st: {"path": absolute, normalised, "size": bytes, "mtime_ns", "mtime_utc": ISO-8601,
// "sha256_head_tail_64k": SHA-256 of its first 64 KiB followed by its last 64 KiB (the bytes after the first
// 64 KiB only: a file of at most 128 KiB gives the digest of the whole file)}. Numbers as decimal strings. The
// key says it is not the file's digest: files that differ only in the middle and keep size and mtime are not
// told apart. Throws std::runtime_error naming the file when it cannot be read.
std::map<std::string, std::string> large_file_identity(const std::string& path, int fd, const struct stat& st);

}  // namespace fw
