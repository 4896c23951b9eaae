// ECL payload unpacker (spec/wire-format.md, "ECL payload"): little-endian 32-bit words,
// blocks (0xEC marker, collector id, length) of shapers (0x10 marker, shaper id, channel mask)
// followed by one hit word per set mask bit. Plain C++ on bytes, no framework types.
//
// Rules (each broken rule rejects the event with the reason in brackets):
//  - payload length a multiple of 4 bytes                          [payload_not_words]
//  - block header marker 0xEC                                      [bad_block_marker]
//  - collector id 1..255                                           [bad_collector_id]
//  - block length within the payload                               [block_overrun]
//  - a collector at most once per event                            [duplicate_collector]
//  - shaper header marker 0x10                                     [bad_shaper_marker]
//  - shaper id 1..12                                               [bad_shaper_id]
//  - a shaper at most once per block                               [duplicate_shaper]
//  - one hit word per mask bit, inside the block                   [missing_hit_words]
//  - every (collector, shaper, channel) with a hit maps to a crystal of the event's detector
//    (belle2-ecl: cellId 1..8736, array30: 1..900; the linear map of the spec, or the channel
//    map of the run's conditions)                                  [unmapped_channel]
// Words left in a block after its last complete shaper: the block's `length` is authoritative
// and a block holds nothing but shapers, so a word after a shaper's hit words is read as the
// next shaper header: anything else is bad_shaper_marker, and a shaper whose hit words would
// run past the end of the block is missing_hit_words. Empty blocks (length 0), shapers with an
// empty mask and an empty payload are valid. Every field value of a hit word is valid
// (amplitude field 0..2^18-1 gives -128..262015 counts; quality 0..3; time -2048..2047 ticks,
// also for quality 2 where the time is flagged as not valid: it is decoded all the same).
//
// Calibration: energy = float(amplitude * (gain[cellId] / 20000)) and
// time = float(ticks * 0.4913 - t0[cellId]), both computed in double (the product ticks * 0.4913
// from a table, so no fused multiply-add can change the rounding) and stored as float32.
// Digits come out sorted by cellId (blocks and shapers may come in any order).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ecl {

constexpr double kTickNs = 0.4913;
constexpr double kAdcPerGeV = 20000.0;

// Per-detector calibration: table[2 (cellId - 1)] = gain / 20000, table[2 (cellId - 1) + 1] = t0
// (interleaved: one cache line per digit).
struct Calibration {
  int n_cells = 0;
  std::vector<double> table;
  static Calibration defaults(int n_cells);
  // gain and t0 of n_cells entries each (empty: the default).
  static Calibration from(int n_cells, const std::vector<double>& gain, const std::vector<double>& t0);
};

// Electronics addresses: collector 1..255, shaper 1..12, channel 0..15. The address index
// ((collector - 1) * 12 + shaper - 1) * 16 + channel is cellId - 1 under the spec's linear map.
constexpr int kMaxCollector = 255, kShapersPerCollector = 12, kChannelsPerShaper = 16;
constexpr int kAddresses = kMaxCollector * kShapersPerCollector * kChannelsPerShaper;
inline int address_index(int collector, int shaper, int channel) {
  return ((collector - 1) * kShapersPerCollector + (shaper - 1)) * kChannelsPerShaper + channel;
}

// Channel map (spec: conditions data a run may override). Empty: the spec's linear map, decoded
// without a table look-up; else cell_index[address_index] = cellId - 1, or -1 for an address
// that reads no crystal.
struct ChannelMap {
  int n_cells = 0;
  std::vector<int16_t> cell_index;
  bool linear() const { return cell_index.empty(); }
  // address_of_cell[k] = (collector, shaper, channel) of cellId k + 1, n_cells entries, each
  // address used once (std::invalid_argument naming the first entry that breaks a rule).
  static ChannelMap from(int n_cells, const std::vector<std::array<int, 3>>& address_of_cell);
};

// Output arrays, each with room for at least payload_size / 4 digits.
struct DigitOut {
  int32_t* cell;
  float* energy;
  float* time;
  uint8_t* quality;
  int32_t* amplitude;
};

struct UnpackResult {
  const char* reason = nullptr;  // nullptr: valid; else a static code (see above)
  std::string detail;
  size_t n_digits = 0;
  bool ok() const { return reason == nullptr; }
};

// Decodes one payload. `scratch` is reused between calls (touched when blocks or shapers come out
// of cellId order, and with a channel map). Nothing else is allocated. A channel map must be of
// the calibration's detector (std::invalid_argument).
UnpackResult unpack_payload(const uint8_t* payload, size_t size, const Calibration& calib, const ChannelMap& map,
                            DigitOut out, std::vector<uint64_t>* scratch = nullptr);

// Upper bound of the digits a payload can hold.
inline size_t max_digits(size_t payload_size) { return payload_size / 4; }

}  // namespace ecl
