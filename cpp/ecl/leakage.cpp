#include "ecl/leakage.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <utility>

#include "framework/sha256.hpp"

namespace ecl {

namespace {

uint32_t rd32(const unsigned char* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t(p[3]) << 24); }
uint16_t rd16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// Value of 'key' in a .npy header dict (the text after "'key':").
std::string header_field(const std::string& h, const std::string& key) {
  const auto k = h.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error("npy header without " + key);
  auto p = h.find(':', k) + 1;
  while (p < h.size() && h[p] == ' ') ++p;
  if (h[p] == '\'') return h.substr(p + 1, h.find('\'', p + 1) - p - 1);
  if (h[p] == '(') return h.substr(p + 1, h.find(')', p) - p - 1);
  auto e = h.find_first_of(",}", p);
  return h.substr(p, e - p);
}

// Parses one .npy image at `p` (at most `avail` bytes); returns its total size in bytes.
size_t parse_npy(const unsigned char* p, size_t avail, NpyArray& out, bool& numeric) {
  if (avail < 10 || std::memcmp(p, "\x93NUMPY", 6) != 0) throw std::runtime_error("not an npy array");
  const int major = p[6];
  size_t hlen, hstart;
  if (major == 1) hlen = rd16(p + 8), hstart = 10;
  else hlen = rd32(p + 8), hstart = 12;
  if (hstart + hlen > avail) throw std::runtime_error("truncated npy header");
  const std::string h(reinterpret_cast<const char*>(p + hstart), hlen);
  const std::string descr = header_field(h, "descr");
  if (header_field(h, "fortran_order").find("True") != std::string::npos)
    throw std::runtime_error("fortran-order arrays are not supported");
  out.shape.clear();
  const std::string shape = header_field(h, "shape");
  size_t count = 1;
  for (size_t q = 0; q < shape.size();) {
    while (q < shape.size() && (shape[q] == ' ' || shape[q] == ',')) ++q;
    if (q >= shape.size()) break;
    size_t e = q;
    while (e < shape.size() && std::isdigit(static_cast<unsigned char>(shape[e]))) ++e;
    if (e == q || e - q > 12) throw std::runtime_error("bad npy shape (" + shape + ")");
    const int64_t d = std::stoll(shape.substr(q, e - q));
    out.shape.push_back(d);
    if (__builtin_mul_overflow(count, static_cast<size_t>(d), &count)) throw std::runtime_error("npy shape too large");
    q = e;
  }
  if (descr.size() < 3 || descr.size() > 6 || !std::all_of(descr.begin() + 2, descr.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c));
      }))
    throw std::runtime_error("bad npy descr '" + descr + "'");
  const char kind = descr[1];
  const size_t item = std::stoul(descr.substr(2));
  // the sizes the reader below handles (a larger integer would be copied past its 8 bytes)
  const bool known = ((kind == 'i' || kind == 'u') && (item == 1 || item == 2 || item == 4 || item == 8)) ||
                     (kind == 'f' && (item == 4 || item == 8)) || (kind == 'b' && item == 1) || kind == 'U' ||
                     kind == 'S' || kind == 'O';
  if (!known) throw std::runtime_error("unsupported npy dtype '" + descr + "'");
  const size_t itemsize = kind == 'U' ? 4 * item : item;
  size_t nbytes = 0;  // hstart + hlen <= avail (checked above)
  if (__builtin_mul_overflow(count, itemsize, &nbytes) || nbytes > avail - (hstart + hlen))
    throw std::runtime_error("truncated npy data");
  const unsigned char* d = p + hstart + hlen;
  if (descr[0] == '>') throw std::runtime_error("big-endian arrays are not supported");
  numeric = kind == 'f' || kind == 'i' || kind == 'u' || kind == 'b';
  out.data.clear();
  if (numeric) {
    out.data.resize(count);
    for (size_t i = 0; i < count; ++i) {
      const unsigned char* x = d + i * itemsize;
      double v = 0;
      if (kind == 'f' && item == 8) { double t; std::memcpy(&t, x, 8); v = t; }
      else if (kind == 'f' && item == 4) { float t; std::memcpy(&t, x, 4); v = t; }
      else if (kind == 'i' || kind == 'u') {
        int64_t t = 0; uint64_t ut = 0;
        std::memcpy(&ut, x, item);
        if (kind == 'i' && item < 8 && (ut >> (8 * item - 1)) & 1) ut |= ~uint64_t{0} << (8 * item);
        std::memcpy(&t, &ut, 8);
        v = kind == 'i' ? double(t) : double(ut);
      } else if (kind == 'b') v = x[0] ? 1.0 : 0.0;
      else throw std::runtime_error("unsupported npy dtype " + descr);
      out.data[i] = v;
    }
  }
  return hstart + hlen + nbytes;
}

}  // namespace

std::map<std::string, NpyArray> read_npz(const std::string& path, std::string* sha256) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  const std::vector<unsigned char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (sha256) *sha256 = fw::sha256_hex(buf.data(), buf.size());
  std::map<std::string, NpyArray> out;
  size_t pos = 0;
  while (pos + 30 <= buf.size() && rd32(&buf[pos]) == 0x04034b50) {
    const unsigned char* h = &buf[pos];
    if (rd16(h + 8) != 0) throw std::runtime_error(path + ": compressed npz (write it with numpy.savez)");
    const size_t nlen = rd16(h + 26), xlen = rd16(h + 28);
    std::string name(reinterpret_cast<const char*>(h + 30), nlen);
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".npy") == 0) name.resize(name.size() - 4);
    const size_t start = pos + 30 + nlen + xlen;
    if (start > buf.size()) throw std::runtime_error(path + ": truncated");
    NpyArray a;
    bool numeric = false;
    size_t len = 0;
    try {
      len = parse_npy(&buf[start], buf.size() - start, a, numeric);
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": member '" + name + "': " + e.what());
    }
    if (numeric) out[name] = std::move(a);
    // Next local header (skips an optional data descriptor).
    pos = start + len;
    const size_t limit = std::min(buf.size(), pos + 64);
    while (pos + 4 <= limit && rd32(&buf[pos]) != 0x04034b50 && rd32(&buf[pos]) != 0x02014b50) ++pos;
    if (pos + 4 > limit) break;
  }
  if (out.empty()) throw std::runtime_error(path + ": no arrays (not an npz file?)");
  return out;
}

LeakageTable LeakageTable::load(const std::string& path) {
  std::string sha256;
  const auto arrays = read_npz(path, &sha256);
  auto need = [&](const std::string& k) -> const NpyArray& {
    auto it = arrays.find(k);
    if (it == arrays.end()) throw std::runtime_error(path + ": leakage table without '" + k + "'");
    return it->second;
  };
  LeakageTable t;
  t.path_ = path;
  t.sha256_ = std::move(sha256);
  const auto& det = need("detector_code").data;
  if (det.size() != 1 || !(det[0] == 0 || det[0] == 1))
    throw std::runtime_error(path + ": detector_code must be 0 (belle2-ecl) or 1 (array30)");
  t.detector_ = static_cast<int>(det[0]);
  const auto& codes = need("axis_codes").data;
  const auto& linear = need("axis_linear").data;
  const auto& resp = need("response");
  if (codes.size() != linear.size() || codes.size() != resp.shape.size() || codes.empty())
    throw std::runtime_error(path + ": inconsistent axes");
  if (codes.size() > static_cast<size_t>(kMaxAxes))
    throw std::runtime_error(path + ": more than " + std::to_string(kMaxAxes) + " axes");
  if (static_cast<int>(codes[0]) != static_cast<int>(AxisVar::LogEnergyRaw))
    throw std::runtime_error(path + ": axis 0 must be log_energy_raw");
  for (size_t k = 0; k < codes.size(); ++k) {
    if (codes[k] != std::floor(codes[k]) || codes[k] < 0 || codes[k] > 5)
      throw std::runtime_error(path + ": unknown axis code " + std::to_string(codes[k]));
    Axis a{static_cast<AxisVar>(static_cast<int>(codes[k])), linear[k] != 0,
           need("centers_" + std::to_string(k)).data};
    if (static_cast<int64_t>(a.centers.size()) != resp.shape[k] || a.centers.empty())
      throw std::runtime_error(path + ": centers_" + std::to_string(k) + " does not match the response shape");
    for (size_t i = 0; i < a.centers.size(); ++i)
      if (!std::isfinite(a.centers[i]) || (i && !(a.centers[i] > a.centers[i - 1])))
        throw std::runtime_error(path + ": centers_" + std::to_string(k) + " must be finite and increasing");
    t.axes_.push_back(std::move(a));
  }
  // the response is the mean E_raw/E_true of its bin: a correction divides by it
  for (double r : resp.data)
    if (!std::isfinite(r) || !(r > 0)) throw std::runtime_error(path + ": response values must be finite and > 0");
  t.strides_.assign(t.axes_.size(), 1);
  for (int k = static_cast<int>(t.axes_.size()) - 2; k >= 0; --k)
    t.strides_[k] = t.strides_[k + 1] * static_cast<int64_t>(t.axes_[k + 1].centers.size());
  t.response_ = resp.data;
  return t;
}

double LeakageTable::response(double energy_raw, int ring, double u, double v) const {
  if (response_.empty() || !(energy_raw > 0)) return 1.0;
  const int d = static_cast<int>(axes_.size());  // <= kMaxAxes (load)
  int64_t lo[kMaxAxes];
  double frac[kMaxAxes];
  int nlin = 0;
  for (int k = 0; k < d; ++k) {
    const Axis& a = axes_[k];
    double x = 0;
    const double au = std::min(0.5, std::fabs(u)), av = std::min(0.5, std::fabs(v));
    switch (a.var) {
      case AxisVar::LogEnergyRaw: x = std::log(energy_raw); break;
      case AxisVar::Ring: x = ring; break;
      case AxisVar::AbsUVMax: x = std::max(au, av); break;
      case AxisVar::AbsUVMin: x = std::min(au, av); break;
      case AxisVar::AbsU: x = au; break;
      case AxisVar::AbsV: x = av; break;
    }
    const auto& c = a.centers;
    const int64_t n = static_cast<int64_t>(c.size());
    if (!a.linear || n == 1) {
      const int64_t i = std::lower_bound(c.begin(), c.end(), x) - c.begin();
      int64_t best = std::min(i, n - 1);
      if (i > 0 && (i == n || std::fabs(c[i - 1] - x) <= std::fabs(c[i] - x))) best = i - 1;
      lo[k] = best, frac[k] = 0.0;
    } else if (x <= c[0]) {
      lo[k] = 0, frac[k] = 0.0;
    } else if (x >= c[n - 1]) {
      lo[k] = n - 2, frac[k] = 1.0;
    } else {
      const int64_t i = std::upper_bound(c.begin(), c.end(), x) - c.begin() - 1;
      lo[k] = i, frac[k] = (x - c[i]) / (c[i + 1] - c[i]);
      ++nlin;
    }
  }
  double r = 0;
  for (int corner = 0; corner < (1 << d); ++corner) {
    double w = 1.0;
    int64_t idx = 0;
    for (int k = 0; k < d; ++k) {
      const int up = (corner >> k) & 1;
      const bool lin = axes_[k].linear && axes_[k].centers.size() > 1;
      if (!lin && up) { w = 0; break; }
      w *= lin ? (up ? frac[k] : 1.0 - frac[k]) : 1.0;
      idx += (lo[k] + up) * strides_[k];
    }
    if (w != 0) r += w * response_[idx];
  }
  (void)nlin;
  return r;
}

}  // namespace ecl
