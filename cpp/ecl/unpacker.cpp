#include "ecl/unpacker.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace ecl {

namespace {

inline uint32_t load_le32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

// Bits set in a 16-bit mask (a table: baseline x86-64 has no popcnt instruction).
struct PopTable {
  uint8_t n[256];
  PopTable() {
    for (int v = 0; v < 256; ++v) n[v] = static_cast<uint8_t>(__builtin_popcount(v));
  }
};
const PopTable kPop;
inline unsigned popcount16(uint32_t m) { return kPop.n[m & 0xff] + kPop.n[(m >> 8) & 0xff]; }

// The time is ticks * kTickNs - t0 in double, as the numpy reference computes it. (A table of
// ticks * kTickNs, 32 kB, competed with the calibration table for L1: the multiply is cheaper.)
inline void emit(const DigitOut& out, size_t k, long i, uint32_t word, const double* cal) {
  const int32_t amp = static_cast<int32_t>(word & 0x3ffffu) - 128;
  const int32_t ticks = static_cast<int32_t>(word << 2) >> 20;
  out.cell[k] = static_cast<int32_t>(i + 1);
  out.amplitude[k] = amp;
  out.quality[k] = static_cast<uint8_t>(word >> 30);
  out.energy[k] = static_cast<float>(amp * cal[2 * i]);
  out.time[k] = static_cast<float>(ticks * kTickNs - cal[2 * i + 1]);
}

__attribute__((noinline, cold)) UnpackResult fail(const char* reason, const char* fmt, unsigned long a = 0,
                                                   unsigned long b = 0, unsigned long c = 0, unsigned long d = 0,
                                                   unsigned long e = 0) {
  UnpackResult r;
  r.reason = reason;
  char buf[192];
  std::snprintf(buf, sizeof buf, fmt, a, b, c, d, e);
  r.detail = buf;
  return r;
}

}  // namespace

Calibration Calibration::defaults(int n_cells) { return from(n_cells, {}, {}); }

Calibration Calibration::from(int n_cells, const std::vector<double>& gain, const std::vector<double>& t0) {
  if (!gain.empty() && gain.size() != static_cast<size_t>(n_cells))
    throw std::invalid_argument("gain has " + std::to_string(gain.size()) + " entries, expected " +
                                std::to_string(n_cells));
  if (!t0.empty() && t0.size() != static_cast<size_t>(n_cells))
    throw std::invalid_argument("t0 has " + std::to_string(t0.size()) + " entries, expected " +
                                std::to_string(n_cells));
  Calibration c;
  c.n_cells = n_cells;
  c.table.assign(2 * static_cast<size_t>(n_cells), 0.0);
  for (size_t i = 0; i < static_cast<size_t>(n_cells); ++i) {
    c.table[2 * i] = (gain.empty() ? 1.0 : gain[i]) / kAdcPerGeV;
    c.table[2 * i + 1] = t0.empty() ? 0.0 : t0[i];
  }
  return c;
}

ChannelMap ChannelMap::from(int n_cells, const std::vector<std::array<int, 3>>& address_of_cell) {
  if (address_of_cell.size() != static_cast<size_t>(n_cells))
    throw std::invalid_argument("channel map has " + std::to_string(address_of_cell.size()) + " entries, expected " +
                                std::to_string(n_cells) + " (one address per cellId)");
  ChannelMap m;
  m.n_cells = n_cells;
  m.cell_index.assign(kAddresses, -1);
  for (size_t k = 0; k < address_of_cell.size(); ++k) {
    const auto [coll, sh, ch] = address_of_cell[k];
    auto where = [&, coll = coll, sh = sh, ch = ch] {  // the message's start, built only for an error
      return "channel map entry " + std::to_string(k) + " (cellId " + std::to_string(k + 1) + "): address (" +
             std::to_string(coll) + ", " + std::to_string(sh) + ", " + std::to_string(ch) + ") ";
    };
    if (coll < 1 || coll > kMaxCollector || sh < 1 || sh > kShapersPerCollector || ch < 0 || ch >= kChannelsPerShaper)
      throw std::invalid_argument(where() + "outside collector 1..255, shaper 1..12, channel 0..15");
    int16_t& slot = m.cell_index[address_index(coll, sh, ch)];
    if (slot >= 0) throw std::invalid_argument(where() + "already reads cellId " + std::to_string(slot + 1));
    slot = static_cast<int16_t>(k);
  }
  return m;
}

namespace {

// The decoder body, instantiated with the popcnt instruction (the shaper-to-shaper dependency
// chain runs through the popcount of the channel mask) and without it, and for the spec's linear
// channel map (cellId from the address by arithmetic) and for a conditions' map (a table).
template <bool kPopcnt, bool kMapped>
__attribute__((always_inline)) inline UnpackResult unpack_impl(const uint8_t* payload, size_t size,
                                                               const Calibration& calib, const ChannelMap& map,
                                                               DigitOut out, std::vector<uint64_t>* scratch) {
  if (size % 4 != 0)
    return fail("payload_not_words", "payload of %lu bytes is not a whole number of 32-bit words", size);
  const size_t nw = size / 4;
  const long n_cells = calib.n_cells;
  const double* cal = calib.table.data();

  // Mapped: the hits land in cellId order without a sort. Bit i of `present` marks cellId i + 1
  // and hit[i] holds its hit word; the digits are emitted from the bits at the end.
  [[maybe_unused]] const size_t n_bits = (static_cast<size_t>(n_cells) + 63) / 64;
  uint64_t* present = nullptr;
  uint64_t* hit = nullptr;
  std::vector<uint64_t> local_map_scratch;
  if constexpr (kMapped) {
    std::vector<uint64_t>& buf = scratch ? *scratch : local_map_scratch;
    buf.resize(n_bits + static_cast<size_t>(n_cells));
    present = buf.data();
    hit = present + n_bits;
    std::memset(present, 0, n_bits * sizeof(uint64_t));
  }

  uint64_t collectors_seen[4] = {0, 0, 0, 0};
  size_t w = 0, nd = 0;
  long last_cell = 0;
  bool sorted = true;
  while (w < nw) {
    const uint32_t h = load_le32(payload + 4 * w);
    if ((h >> 24) != 0xECu)
      return fail("bad_block_marker", "word %lu: block header 0x%08lx lacks the 0xEC marker", w, h);
    const uint32_t coll = (h >> 16) & 0xffu;
    if (coll == 0) return fail("bad_collector_id", "word %lu: collector id 0 (1..255)", w);
    const size_t len = h & 0xffffu;
    if (len > nw - w - 1)
      return fail("block_overrun", "word %lu: block of collector %lu claims %lu words, %lu left in the payload", w,
                  coll, len, nw - w - 1);
    if (collectors_seen[coll >> 6] & (uint64_t(1) << (coll & 63)))
      return fail("duplicate_collector", "word %lu: collector %lu appears a second time", w, coll);
    collectors_seen[coll >> 6] |= uint64_t(1) << (coll & 63);
    const size_t end = w + 1 + len;
    ++w;
    uint32_t shapers_seen = 0;
    const long coll_base = static_cast<long>(coll - 1) * 192;
    while (w < end) {
      const uint32_t s = load_le32(payload + 4 * w);
      if ((s >> 24) != 0x10u)
        return fail("bad_shaper_marker", "word %lu: shaper header 0x%08lx lacks the 0x10 marker (collector %lu)", w, s,
                    coll);
      const uint32_t sh = (s >> 16) & 0xffu;
      if (sh < 1 || sh > 12)
        return fail("bad_shaper_id", "word %lu: shaper id %lu (1..12) in collector %lu", w, sh, coll);
      if (shapers_seen & (1u << sh))
        return fail("duplicate_shaper", "word %lu: shaper %lu appears twice in collector %lu", w, sh, coll);
      shapers_seen |= 1u << sh;
      uint32_t mask = s & 0xffffu;
      const size_t nh = static_cast<size_t>(kPopcnt ? __builtin_popcount(mask) : popcount16(mask));
      if (nh > end - w - 1)
        return fail("missing_hit_words", "word %lu: shaper %lu of collector %lu has %lu channels set, only %lu words left in the block",
                    w, sh, coll, nh, end - w - 1);
      ++w;
      if (!mask) continue;
      const long base = coll_base + static_cast<long>(sh - 1) * 16;  // address index of channel 0
      if constexpr (kMapped) {
        // Every index in the table is below n_cells (ChannelMap::from, checked in unpack_payload);
        // an address appears once per event (collectors and shapers do), so a cell does too.
        const int16_t* index = map.cell_index.data() + base;
        const uint8_t* hp = payload + 4 * w;
        w += nh;
        nd += nh;
        for (uint32_t rest = mask; rest; rest &= rest - 1) {
          const long i = index[__builtin_ctz(rest)];
          if (i < 0)
            return fail("unmapped_channel",
                        "collector %lu shaper %lu channel %lu maps to no crystal in the conditions' channel map", coll,
                        sh, static_cast<unsigned long>(__builtin_ctz(rest)));
          present[i >> 6] |= uint64_t(1) << (i & 63);
          hit[i] = load_le32(hp);
          hp += 4;
        }
        continue;
      }
      const long hi = base + 31 - __builtin_clz(mask);
      if (hi >= n_cells)
        return fail("unmapped_channel", "collector %lu shaper %lu channel %lu maps to no crystal of the detector", coll,
                    sh, static_cast<unsigned long>(hi - base));
      sorted &= base + __builtin_ctz(mask) + 1 > last_cell;
      last_cell = hi + 1;
      const uint8_t* hp = payload + 4 * w;
      w += nh;
      // Most shapers carry one or two hits: both are decoded without a data-dependent branch
      // (the second one speculatively, from an in-bounds word, and only kept when nh >= 2: the
      // output arrays hold a digit per payload word, so writing at nd + 1 is always in range).
      {
        const long i0 = base + __builtin_ctz(mask);
        const uint32_t m1 = mask & (mask - 1);
        const long i1 = m1 ? base + __builtin_ctz(m1) : i0;
        emit(out, nd, i0, load_le32(hp), cal);
        emit(out, nd + 1, i1, load_le32(hp + (nh > 1 ? 4 : 0)), cal);
        nd += nh;
        if (__builtin_expect(nh > 2, 0)) {
          uint32_t rest = m1 & (m1 - 1);
          size_t k = nd - nh + 2;
          hp += 8;
          do {
            const long i = base + __builtin_ctz(rest);
            rest &= rest - 1;
            emit(out, k++, i, load_le32(hp), cal);
            hp += 4;
          } while (rest);
        }
      }
    }
  }

  if constexpr (kMapped) {
    size_t k = 0;
    for (size_t b = 0; b < n_bits; ++b)
      for (uint64_t m = present[b]; m; m &= m - 1) {
        const long i = static_cast<long>(b * 64 + __builtin_ctzll(m));
        emit(out, k++, i, static_cast<uint32_t>(hit[i]), cal);
      }
    UnpackResult r;
    r.n_digits = nd;
    return r;
  }
  if (!sorted && nd > 1) {
    // Blocks or shapers out of cellId order (allowed by the format): sort the event's digits.
    std::vector<uint64_t> local;
    std::vector<uint64_t>& buf = scratch ? *scratch : local;
    buf.resize(3 * nd);
    uint64_t* key = buf.data();
    uint64_t* et = key + nd;
    uint64_t* aq = et + nd;
    for (size_t k = 0; k < nd; ++k) {
      key[k] = (static_cast<uint64_t>(out.cell[k]) << 32) | k;
      uint32_t e, t;
      std::memcpy(&e, &out.energy[k], 4);
      std::memcpy(&t, &out.time[k], 4);
      et[k] = (static_cast<uint64_t>(e) << 32) | t;
      aq[k] = (static_cast<uint64_t>(static_cast<uint32_t>(out.amplitude[k])) << 32) | out.quality[k];
    }
    std::sort(key, key + nd);
    for (size_t k = 0; k < nd; ++k) {
      const size_t src = key[k] & 0xffffffffu;
      out.cell[k] = static_cast<int32_t>(key[k] >> 32);
      const uint32_t e = static_cast<uint32_t>(et[src] >> 32), t = static_cast<uint32_t>(et[src]);
      std::memcpy(&out.energy[k], &e, 4);
      std::memcpy(&out.time[k], &t, 4);
      out.amplitude[k] = static_cast<int32_t>(static_cast<uint32_t>(aq[src] >> 32));
      out.quality[k] = static_cast<uint8_t>(aq[src]);
    }
  }
  UnpackResult r;
  r.n_digits = nd;
  return r;
}


#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <bool kMapped>
__attribute__((target("popcnt"))) UnpackResult unpack_fast(const uint8_t* payload, size_t size,
                                                          const Calibration& calib, const ChannelMap& map,
                                                          DigitOut out, std::vector<uint64_t>* scratch) {
  return unpack_impl<true, kMapped>(payload, size, calib, map, out, scratch);
}
const bool kHavePopcnt = __builtin_cpu_supports("popcnt");
#else
template <bool kMapped>
UnpackResult unpack_fast(const uint8_t* payload, size_t size, const Calibration& calib, const ChannelMap& map,
                         DigitOut out, std::vector<uint64_t>* scratch) {
  return unpack_impl<true, kMapped>(payload, size, calib, map, out, scratch);
}
const bool kHavePopcnt = true;
#endif

template <bool kMapped>
UnpackResult unpack_generic(const uint8_t* payload, size_t size, const Calibration& calib, const ChannelMap& map,
                            DigitOut out, std::vector<uint64_t>* scratch) {
  return unpack_impl<false, kMapped>(payload, size, calib, map, out, scratch);
}

}  // namespace

UnpackResult unpack_payload(const uint8_t* payload, size_t size, const Calibration& calib, const ChannelMap& map,
                            DigitOut out, std::vector<uint64_t>* scratch) {
  if (!map.linear() && map.n_cells != calib.n_cells)
    throw std::invalid_argument("channel map of " + std::to_string(map.n_cells) + " cells with a calibration of " +
                                std::to_string(calib.n_cells));
  if (map.linear())
    return kHavePopcnt ? unpack_fast<false>(payload, size, calib, map, out, scratch)
                       : unpack_generic<false>(payload, size, calib, map, out, scratch);
  return kHavePopcnt ? unpack_fast<true>(payload, size, calib, map, out, scratch)
                     : unpack_generic<true>(payload, size, calib, map, out, scratch);
}

}  // namespace ecl
