#include "ecl/digit_summary.hpp"

#include <cmath>

namespace ecl {

void count_out_of_time_digits(const float* __restrict time, const uint8_t* __restrict quality, const int64_t* offsets,
                              size_t n_events, float time_ns, float* __restrict out) {
  for (size_t i = 0; i < n_events; ++i) {
    // int32 flags and sum (an event has at most 8736 digits): the loop vectorizes 1.5x better
    // than with an int64 sum of bools (193k digits: 34 instead of 51 us)
    int32_t n = 0;
    const int64_t b = offsets[i], e = offsets[i + 1];
    for (int64_t k = b; k < e; ++k) {
      const int32_t late = std::fabs(time[k]) > time_ns;
      const int32_t valid = quality[k] == 0;
      n += late & valid;
    }
    out[i] = static_cast<float>(n);
  }
}

}  // namespace ecl
