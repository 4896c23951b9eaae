#include "ecl/envelope.hpp"

#include <cstdio>
#include <cstring>
#include <limits>

#include <msgpack.hpp>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ECL_CRC_PCLMUL 1
#endif

namespace ecl {

namespace {

// The spec's crc32 is unsigned: a signed int32 CRC (Java's int) is out_of_range, not read modulo 2^32;
// the rejection says what the value must be.
constexpr const char* kCrcRange = "the CRC-32 is unsigned, 0..2^32-1";

enum Key : int { kV, kExp, kRun, kEvt, kDet, kEcl, kTimeNs, kCrc32, kTruth, kNumKeys, kUnknown = -1, kBadKey = -2 };
constexpr const char* kKeyNames[kNumKeys] = {"v", "exp", "run", "evt", "det", "ecl", "time_ns", "crc32", "truth"};
constexpr unsigned kRequired = (1u << kV) | (1u << kExp) | (1u << kRun) | (1u << kEvt) | (1u << kDet) | (1u << kEcl);

Key key_of(const char* s, uint32_t n) {
  for (int k = 0; k < kNumKeys; ++k)
    if (std::strlen(kKeyNames[k]) == n && std::memcmp(kKeyNames[k], s, n) == 0) return static_cast<Key>(k);
  return kUnknown;
}

// Bytes of the MessagePack int whose first byte is b (0 when b starts no int).
size_t int_size(uint8_t b) {
  if (b <= 0x7f || b >= 0xe0) return 1;  // positive / negative fixint
  switch (b) {
    case 0xcc: case 0xd0: return 2;
    case 0xcd: case 0xd1: return 3;
    case 0xce: case 0xd2: return 5;
    case 0xcf: case 0xd3: return 9;
    default: return 0;
  }
}

// "1 byte", "2 bytes": the count of bytes in a detail ("(1 bytes)" read as a typo).
std::string n_bytes(size_t n) { return std::to_string(n) + (n == 1 ? " byte" : " bytes"); }

const char* type_word(int t) {
  static const char* names[] = {"nil", "bool", "int", "float", "str", "bin", "ext", "array", "map"};
  return names[t];
}
enum VType { TNil, TBool, TInt, TFloat, TStr, TBin, TExt, TArray, TMap };

// SAX visitor over one MessagePack object. It never stops the parser early: the object is
// always walked to its end so that its length is known (framing) and structural errors
// (not MessagePack, truncated) take precedence over field errors.
class EnvelopeVisitor : public msgpack::null_visitor {
 public:
  EnvelopeVisitor(const uint8_t* base, Envelope& env) : base_(reinterpret_cast<const char*>(base)), env_(env) {}

  bool visit_nil() { return scalar(TNil); }
  bool visit_boolean(bool) { return scalar(TBool); }
  bool visit_float32(float) { return scalar(TFloat); }
  bool visit_float64(double) { return scalar(TFloat); }
  bool visit_ext(const char*, uint32_t) { return scalar(TExt); }
  bool visit_positive_integer(uint64_t v) {
    if (!top_value()) return scalar(TInt);
    switch (key_) {
      case kV:
        if (v != 1) version_error("bad_version", "v = " + std::to_string(v) + ": only version 1 is known");
        break;
      case kExp:
        env_.exp = v;
        env_.known |= kKnownExp;
        break;
      case kRun:
        env_.run = v;
        env_.known |= kKnownRun;
        env_.run_offset = value_offset_;
        env_.run_size = int_size(static_cast<uint8_t>(base_[value_offset_]));
        break;
      case kEvt:
        if (v > 0xFFFFFFFFull) {
          error("out_of_range", "evt = " + std::to_string(v) + " is not below 2^32");
        } else {
          env_.evt = static_cast<uint32_t>(v);
          env_.known |= kKnownEvt;
          env_.evt_offset = value_offset_;
          env_.evt_size = int_size(static_cast<uint8_t>(base_[value_offset_]));
        }
        break;
      case kTimeNs:
        if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          error("out_of_range", "time_ns = " + std::to_string(v) + " does not fit int64");
        else {
          env_.has_time = true;
          env_.time_ns = static_cast<int64_t>(v);
        }
        break;
      case kCrc32:
        if (v > 0xFFFFFFFFull)
          error("out_of_range", "crc32 = " + std::to_string(v) + " does not fit 32 bits; " + kCrcRange);
        else {
          env_.has_crc = true;
          env_.crc32 = static_cast<uint32_t>(v);
        }
        break;
      default: return scalar(TInt);
    }
    return true;
  }
  bool visit_negative_integer(int64_t v) {
    // The parser calls this for every signed format (int8..int64, 0xd0-0xd3) whatever the sign:
    // a producer may write 1 as d0 01, and it is still the int 1.
    if (v >= 0) return visit_positive_integer(static_cast<uint64_t>(v));
    if (!top_value()) return scalar(TInt);
    switch (key_) {
      case kV: version_error("bad_version", "v = " + std::to_string(v) + ": only version 1 is known"); break;
      case kExp: case kRun: case kEvt:
        error("out_of_range", std::string(kKeyNames[key_]) + " = " + std::to_string(v) + " is negative");
        break;
      case kTimeNs:
        env_.has_time = true;
        env_.time_ns = v;
        break;
      case kCrc32: error("out_of_range", "crc32 = " + std::to_string(v) + " is negative; " + kCrcRange); break;
      default: return scalar(TInt);
    }
    return true;
  }
  bool visit_str(const char* s, uint32_t n) {
    if (in_top_key()) {
      key_ = key_of(s, n);
      value_offset_ = static_cast<size_t>(s + n - base_);  // the value follows the key's bytes
      return true;
    }
    if (top_value() && key_ == kDet) {
      if (n == 10 && std::memcmp(s, "belle2-ecl", 10) == 0)
        env_.detector = 0;
      else if (n == 7 && std::memcmp(s, "array30", 7) == 0)
        env_.detector = 1;
      else {
        error("unknown_detector", "det = '" + printable(s, n) + "' (belle2-ecl or array30)");
        return true;
      }
      env_.known |= kKnownDet;
      return true;
    }
    return scalar(TStr);
  }
  bool visit_bin(const char* b, uint32_t n) {
    if (top_value() && key_ == kEcl) {
      env_.payload_offset = static_cast<size_t>(b - base_);
      env_.payload_size = n;
      return true;
    }
    return scalar(TBin);
  }
  bool start_array(uint32_t) {
    container(TArray);
    ++depth_;
    return true;
  }
  bool end_array() {
    --depth_;
    return true;
  }
  bool start_map(uint32_t) {
    if (depth_ == 0 && !started_) {
      started_ = true;
      is_map_ = true;
    } else {
      container(TMap);
    }
    ++depth_;
    return true;
  }
  bool end_map() {
    --depth_;
    return true;
  }
  bool start_map_key() {
    if (depth_ == 1) {
      in_key_ = true;
      key_ = kBadKey;  // stays so unless the key is a string
      ++key_number_;
    }
    return true;
  }
  bool end_map_key() {
    if (depth_ == 1) {
      in_key_ = false;
      if (key_ == kBadKey) {
        error("wrong_type", "map key " + std::to_string(key_number_) + " is " + type_word(key_type_) +
                                ", not a string (keys are str)");
        key_ = kUnknown;
      } else if (key_ >= 0) {
        if (seen_ & (1u << key_)) {
          error("duplicate_key", std::string("key '") + kKeyNames[key_] + "' appears twice");
          key_ = kUnknown;  // keep the first value
        } else {
          seen_ |= 1u << key_;
        }
      }
    }
    return true;
  }
  void parse_error(size_t, size_t error_offset) {
    parse_failure_ = "not_msgpack";
    failure_offset_ = error_offset;
  }
  void insufficient_bytes(size_t, size_t error_offset) {
    parse_failure_ = "truncated";
    failure_offset_ = error_offset;
  }

  // Called after the parse.
  void finish() {
    if (!is_map_) {
      set("not_a_map", std::string("the message is a MessagePack ") + type_word(top_type_) + ", not a map");
      return;
    }
    if (version_reason_) {  // an unknown version explains any other difference
      set(version_reason_, version_detail_);
      return;
    }
    if (first_reason_) {
      set(first_reason_, first_detail_);
      return;
    }
    if ((seen_ & kRequired) != kRequired) {
      std::string missing;
      for (int k = 0; k < kNumKeys; ++k)
        if ((kRequired & (1u << k)) && !(seen_ & (1u << k))) missing += (missing.empty() ? "" : ", ") + std::string(kKeyNames[k]);
      set("missing_key", "required key(s) missing: " + missing);
    }
  }
  const char* parse_failure_ = nullptr;
  size_t failure_offset_ = 0;

 private:
  bool in_top_key() const { return depth_ == 1 && in_key_; }
  bool top_value() const { return depth_ == 1 && !in_key_ && is_map_; }

  // A scalar anywhere: records the top-level type, checks the type of a known key's value.
  bool scalar(VType t) {
    if (in_top_key()) {  // not a string key (visit_str takes those): said at its end
      key_type_ = t;
    } else if (!started_) {
      started_ = true;
      top_type_ = t;
    } else if (top_value() && key_ >= 0) {
      wrong_type(t);
    }
    return true;
  }
  void container(VType t) {
    if (in_top_key()) {
      key_type_ = t;
    } else if (!started_) {
      started_ = true;
      top_type_ = t;
    } else if (top_value() && key_ >= 0 && !(key_ == kTruth && t == TMap)) {
      wrong_type(t);
    }
  }
  void wrong_type(VType t) {
    static const char* expected[kNumKeys] = {"int", "int", "int", "int", "str", "bin", "int", "int", "map"};
    const std::string what = std::string("'") + kKeyNames[key_] + "' is " + type_word(t) + ", expected " + expected[key_];
    if (key_ == kV)
      version_error("wrong_type", what);
    else
      error("wrong_type", what);
  }
  void error(const char* reason, std::string detail) {
    if (first_reason_) return;
    first_reason_ = reason;
    first_detail_ = std::move(detail);
  }
  void version_error(const char* reason, std::string detail) {
    if (version_reason_) return;
    version_reason_ = reason;
    version_detail_ = std::move(detail);
  }
  void set(const char* reason, std::string detail) {
    env_.reason = reason;
    env_.detail = std::move(detail);
  }
  static std::string printable(const char* s, uint32_t n) {
    std::string out;
    for (uint32_t i = 0; i < n && i < 40; ++i) out += (s[i] >= 32 && s[i] < 127) ? s[i] : '?';
    if (n > 40) out += "...";
    return out;
  }

  const char* base_;
  Envelope& env_;
  int depth_ = 0;
  bool started_ = false, is_map_ = false, in_key_ = false;
  VType top_type_ = TNil;
  VType key_type_ = TNil;  // of the top-level map's key being read, when it is not a string
  int key_number_ = 0;     // 1 for the map's first key
  int key_ = kUnknown;
  size_t value_offset_ = 0;  // where the value of the current top-level (string) key starts
  unsigned seen_ = 0;
  const char* first_reason_ = nullptr;
  std::string first_detail_;
  const char* version_reason_ = nullptr;
  std::string version_detail_;
};

uint64_t be64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | p[i];
  return v;
}

// A multipart ZeroMQ message marked by its receiver (kMultiFrameTag in envelope.hpp).
bool multi_frame(const uint8_t* data, size_t size, Envelope& env) {
  constexpr size_t head = kMultiFrameTagSize + 8;
  if (size < head || std::memcmp(data, kMultiFrameTag, kMultiFrameTagSize) != 0) return false;
  const uint64_t n = be64(data + kMultiFrameTagSize);
  size_t rest = size - head;
  if (n < 2 || n > rest / 8) return false;
  rest -= 8 * n;
  std::string sizes;
  for (uint64_t k = 0; k < n; ++k) {
    const uint64_t s = be64(data + head + 8 * k);
    if (s > rest) return false;
    rest -= s;
    if (k < 8) sizes += (k ? ", " : "") + std::to_string(s);
  }
  if (rest != 0) return false;
  env.reason = "multi_frame";
  env.detail = "a ZeroMQ message of " + std::to_string(n) + " frames (" + sizes + (n > 8 ? ", ..." : "") +
               " bytes); an event is a message of a single frame";
  return true;
}

Envelope decode(const uint8_t* data, size_t size, bool whole, bool marks = true);

// A message marked by its receiver as over its size limit (kOversizeTag in envelope.hpp).
bool oversize(const uint8_t* data, size_t size, Envelope& env) {
  constexpr size_t head = kOversizeHeadSize;
  if (!has_oversize_head(data, size)) return false;
  const uint64_t limit = be64(data + kOversizeTagSize);
  const size_t n = size - head;
  if (n <= limit) return false;
  // The identifiers, where the message has them (not a second mark: no recursion on bytes).
  const Envelope inner = decode(data + head, n, true, false);
  env.known = inner.known;
  env.exp = inner.exp, env.run = inner.run, env.evt = inner.evt, env.detector = inner.detector;
  env.reason = "oversize";
  env.detail =
      "a message of " + n_bytes(n) + ", over the receiver's limit of " + n_bytes(limit) + " (max_message_bytes)";
  return true;
}

// A producer's message that starts with 0xc1, escaped by its receiver (kVerbatimTag): decoded as
// it was sent, without marks. The receiver escapes only such messages, so other bytes behind the
// tag are no mark (they are what they look like: not_msgpack).
bool verbatim(const uint8_t* data, size_t size, Envelope& env) {
  if (!is_verbatim(data, size)) return false;
  env = decode(data + kVerbatimTagSize, size - kVerbatimTagSize, true, false);
  env.detail = kVerbatimDetail + env.detail;
  return true;
}

Envelope decode(const uint8_t* data, size_t size, bool whole, bool marks) {
  Envelope env;
  if (size == 0) {
    env.reason = "empty_message";
    env.detail = "the message has no bytes";
    return env;
  }
  if (whole && marks && data[0] == 0xc1 &&
      (multi_frame(data, size, env) || oversize(data, size, env) || verbatim(data, size, env)))
    return env;
  EnvelopeVisitor vis(data, env);
  size_t off = 0;
  const bool complete = msgpack::parse(reinterpret_cast<const char*>(data), size, off, vis);
  if (!complete || vis.parse_failure_) {
    env.reason = vis.parse_failure_ ? vis.parse_failure_ : "not_msgpack";
    if (std::strcmp(env.reason, "truncated") == 0)
      env.detail = "the MessagePack object needs more than the " + n_bytes(size) + " given";
    else
      env.detail = "not MessagePack: invalid byte 0x" +
                   [&] {
                     char buf[8];
                     std::snprintf(buf, sizeof buf, "%02x", vis.failure_offset_ < size ? data[vis.failure_offset_] : 0);
                     return std::string(buf);
                   }() +
                   " at byte " + std::to_string(vis.failure_offset_);
    // Identifiers read before the failure stay known, but a failed parse is no message.
    return env;
  }
  env.message_size = off;
  if (whole && off != size) {
    env.reason = "trailing_bytes";
    env.detail = n_bytes(size - off) + " after the end of the MessagePack object (" + n_bytes(off) + ")";
    return env;
  }
  vis.finish();
  if (!env.ok()) return env;
  if (env.has_crc) {
    const uint32_t c = crc32(data + env.payload_offset, env.payload_size);
    if (c != env.crc32) {
      char buf[96];
      std::snprintf(buf, sizeof buf, "crc32 0x%08x given, 0x%08x computed over the %zu payload bytes", env.crc32, c,
                    env.payload_size);
      env.reason = "crc_mismatch";
      env.detail = buf;
    }
  }
  return env;
}

// ---- CRC-32 --------------------------------------------------------------------------------

struct CrcTables {
  uint32_t t[8][256];
  CrcTables() {
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; ++n)
      for (int k = 1; k < 8; ++k) t[k][n] = (t[k - 1][n] >> 8) ^ t[0][t[k - 1][n] & 0xff];
  }
};
const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}

// Slicing-by-8 on the inverted register (c = ~crc).
uint32_t crc32_table(const uint8_t* p, size_t n, uint32_t c) {
  const auto& T = crc_tables().t;
  while (n >= 8) {
    uint32_t a, b;
    std::memcpy(&a, p, 4);
    std::memcpy(&b, p + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    a = __builtin_bswap32(a);
    b = __builtin_bswap32(b);
#endif
    a ^= c;
    c = T[7][a & 0xff] ^ T[6][(a >> 8) & 0xff] ^ T[5][(a >> 16) & 0xff] ^ T[4][a >> 24] ^ T[3][b & 0xff] ^
        T[2][(b >> 8) & 0xff] ^ T[1][(b >> 16) & 0xff] ^ T[0][b >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = T[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#ifdef ECL_CRC_PCLMUL
// Carry-less multiplication folding (Intel, "Fast CRC Computation for Generic Polynomials Using
// PCLMULQDQ"), bit-reflected constants of the CRC-32 polynomial. n >= 64, multiple of 16;
// works on the inverted register like crc32_table.
__attribute__((target("pclmul,sse4.1"))) uint32_t crc32_pclmul(const uint8_t* buf, size_t len, uint32_t crc) {
  alignas(16) static const uint64_t k1k2[] = {0x0154442bd4ull, 0x01c6e41596ull};
  alignas(16) static const uint64_t k3k4[] = {0x01751997d0ull, 0x00ccaa009eull};
  alignas(16) static const uint64_t k5k0[] = {0x0163cd6124ull, 0x0000000000ull};
  alignas(16) static const uint64_t poly[] = {0x01db710641ull, 0x01f7011641ull};
  __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8, y5, y6, y7, y8;
  x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x00));
  x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x10));
  x3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x20));
  x4 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x30));
  x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128(static_cast<int>(crc)));
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k1k2));
  buf += 64;
  len -= 64;
  while (len >= 64) {
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
    x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
    x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
    x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
    y5 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x00));
    y6 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x10));
    y7 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x20));
    y8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 0x30));
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), y5);
    x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), y6);
    x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), y7);
    x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), y8);
    buf += 64;
    len -= 64;
  }
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(k3k4));
  x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
  x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
  x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
  x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
  x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
  x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
  x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
  x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
  x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
  while (len >= 16) {
    x2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf));
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    buf += 16;
    len -= 16;
  }
  x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
  x3 = _mm_setr_epi32(~0, 0, ~0, 0);
  x1 = _mm_srli_si128(x1, 8);
  x1 = _mm_xor_si128(x1, x2);
  x0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(k5k0));
  x2 = _mm_srli_si128(x1, 4);
  x1 = _mm_and_si128(x1, x3);
  x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
  x1 = _mm_xor_si128(x1, x2);
  x0 = _mm_load_si128(reinterpret_cast<const __m128i*>(poly));
  x2 = _mm_and_si128(x1, x3);
  x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
  x2 = _mm_and_si128(x2, x3);
  x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
  x1 = _mm_xor_si128(x1, x2);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}

bool have_pclmul() {
  static const bool ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return ok;
}
#endif

}  // namespace

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc) {
  uint32_t c = ~crc;
#ifdef ECL_CRC_PCLMUL
  if (size >= 64 && have_pclmul()) {
    const size_t chunk = size & ~size_t(15);
    c = crc32_pclmul(data, chunk, c);
    data += chunk;
    size -= chunk;
  }
#endif
  return ~crc32_table(data, size, c);
}

Envelope decode_envelope(const uint8_t* data, size_t size) { return decode(data, size, true); }
Envelope decode_envelope_prefix(const uint8_t* data, size_t size) { return decode(data, size, false); }

size_t frame_stream(const uint8_t* data, size_t size, std::vector<int64_t>& ends, Envelope& stop) {
  size_t pos = 0;
  while (pos < size) {
    Envelope e = decode_envelope_prefix(data + pos, size - pos);
    if (e.message_size == 0) {
      stop = std::move(e);
      break;
    }
    pos += e.message_size;
    ends.push_back(static_cast<int64_t>(pos));
  }
  return pos;
}

}  // namespace ecl
