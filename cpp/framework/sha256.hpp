// SHA-256 (FIPS 180-4) of a byte string, for the provenance of the files a C++ module reads at
// initialize (ECLUnpacker's conditions file): the digest of the bytes it parsed, not of a second
// read of the file, which may have changed in between. Python's hashlib gives the same hex digest.
#pragma once
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

}  // namespace fw
