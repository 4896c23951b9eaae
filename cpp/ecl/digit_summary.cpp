#include "ecl/digit_summary.hpp"

#include <cmath>

namespace ecl {

void count_out_of_time_digits(const float* time, const uint8_t* quality, const int64_t* offsets, size_t n_events,
                              float time_ns, float* out) {
  for (size_t i = 0; i < n_events; ++i) {
    int64_t n = 0;
    for (int64_t k = offsets[i]; k < offsets[i + 1]; ++k) n += (quality[k] == 0) & (std::fabs(time[k]) > time_ns);
    out[i] = static_cast<float>(n);
  }
}

}  // namespace ecl
