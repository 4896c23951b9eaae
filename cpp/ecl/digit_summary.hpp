// Per-event summaries of ECLDigits used as event-level inputs (the CNN's background measure).
#pragma once
#include <cstddef>
#include <cstdint>

namespace ecl {

// A digit with a valid time (quality 0) but |time| > kOutOfTimeNs is out of time. Beam background
// is spread in time, physics deposits are in time: their number measures the event's background.
constexpr float kOutOfTimeNs = 125.0f;

// Out-of-time digits among n (one event's digits).
int32_t count_out_of_time(const float* __restrict time, const uint8_t* __restrict quality, size_t n,
                          float time_ns = kOutOfTimeNs);

}  // namespace ecl
