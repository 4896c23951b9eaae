// Per-event summaries of ECLDigits used as event-level inputs (the CNN's background measure).
#pragma once
#include <cstddef>
#include <cstdint>

namespace ecl {

// out[i] = number of digits of event i with quality 0 (valid time) and |time| > time_ns.
// Beam background is spread in time, physics deposits are in time: this counts background only.
void count_out_of_time_digits(const float* __restrict time, const uint8_t* __restrict quality, const int64_t* offsets,
                              size_t n_events, float time_ns, float* __restrict out);

}  // namespace ecl
