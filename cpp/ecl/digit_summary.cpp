#include "ecl/digit_summary.hpp"

#include <cmath>

namespace ecl {

int32_t count_out_of_time(const float* __restrict time, const uint8_t* __restrict quality, size_t n, float time_ns) {
  // int32 flags and sum (an event has at most 8736 digits): the loop vectorizes 1.5x better
  // than with an int64 sum of bools
  int32_t count = 0;
  for (size_t k = 0; k < n; ++k) {
    const int32_t late = std::fabs(time[k]) > time_ns;
    const int32_t valid = quality[k] == 0;
    count += late & valid;
  }
  return count;
}

}  // namespace ecl
