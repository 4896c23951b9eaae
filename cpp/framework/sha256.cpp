#include "framework/sha256.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <stdexcept>
#include <utility>
#include <vector>

namespace fw {
namespace {

constexpr uint32_t kRound[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void compress(uint32_t h[8], const unsigned char* block) {
  uint32_t w[64];
  for (int i = 0; i < 16; ++i)
    w[i] = uint32_t(block[4 * i]) << 24 | uint32_t(block[4 * i + 1]) << 16 | uint32_t(block[4 * i + 2]) << 8 |
           uint32_t(block[4 * i + 3]);
  for (int i = 16; i < 64; ++i) {
    const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
  for (int i = 0; i < 64; ++i) {
    const uint32_t t1 = k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kRound[i] + w[i];
    const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
  }
  h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

// A file's path as the provenance gives it: absolute and normalised (not resolved: a symlink keeps its name).
std::string absolute_path(const std::string& path) { return std::filesystem::absolute(path).lexically_normal().string(); }

}  // namespace

std::string sha256_hex(const void* data, std::size_t size) {
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  const auto* p = static_cast<const unsigned char*>(data);
  std::size_t n = size;
  for (; n >= 64; p += 64, n -= 64) compress(h, p);
  // The tail, 0x80, zeros and the length in bits (big-endian): one block, or two when fewer than 9 bytes are left
  unsigned char last[128] = {};
  if (n) std::memcpy(last, p, n);
  last[n] = 0x80;
  const std::size_t len = n + 9 <= 64 ? 64 : 128;
  const uint64_t bits = static_cast<uint64_t>(size) * 8;
  for (int i = 0; i < 8; ++i) last[len - 1 - i] = static_cast<unsigned char>(bits >> (8 * i));
  for (std::size_t off = 0; off < len; off += 64) compress(h, last + off);
  static const char kHex[] = "0123456789abcdef";
  std::string out(64, '0');
  for (int i = 0; i < 32; ++i) {
    const unsigned char byte = static_cast<unsigned char>(h[i / 4] >> (24 - 8 * (i % 4)));
    out[2 * i] = kHex[byte >> 4], out[2 * i + 1] = kHex[byte & 15];
  }
  return out;
}

std::map<std::string, std::string> file_provenance(const std::string& path, std::string sha256) {
  return {{"path", absolute_path(path)}, {"sha256", std::move(sha256)}};
}

std::map<std::string, std::string> large_file_identity(const std::string& path, int fd, const struct stat& st) {
  const std::size_t size = static_cast<std::size_t>(st.st_size);
  const std::size_t head = std::min(size, kHeadTailBytes);
  const std::size_t tail_from = std::max(head, size > kHeadTailBytes ? size - kHeadTailBytes : 0);
  std::vector<unsigned char> bytes(head + (size - tail_from));
  auto read_at = [&](std::size_t offset, std::size_t n, unsigned char* into) {
    for (std::size_t got = 0; got < n;) {
      const ssize_t r = ::pread(fd, into + got, n - got, static_cast<off_t>(offset + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0)
        throw std::runtime_error("cannot read file '" + path + "' at byte " + std::to_string(offset + got) + ": " +
                                 (r == 0 ? std::string("it ended before its size, ") + std::to_string(size) + " bytes"
                                         : std::string(std::strerror(errno))));
      got += static_cast<std::size_t>(r);
    }
  };
  read_at(0, head, bytes.data());
  read_at(tail_from, size - tail_from, bytes.data() + head);
  const int64_t mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  std::tm utc{};
  const std::time_t sec = st.st_mtim.tv_sec;
  char when[40] = "";
  if (::gmtime_r(&sec, &utc)) std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &utc);
  char frac[16];
  std::snprintf(frac, sizeof frac, ".%09ldZ", static_cast<long>(st.st_mtim.tv_nsec));
  return {{"path", absolute_path(path)},
          {"size", std::to_string(size)},
          {"mtime_ns", std::to_string(mtime_ns)},
          {"mtime_utc", std::string(when) + frac},
          {"sha256_head_tail_64k", sha256_hex(bytes.data(), bytes.size())}};
}

}  // namespace fw
