#include "framework/gather.hpp"

#include <cmath>
#include <cstring>

namespace fw {

void gather_rows(const int64_t* rows, size_t n_rows, const int64_t* offsets, size_t n_events,
                 const GatherBlock* blocks, size_t n_blocks, float* out) {
  size_t total = 0;
  for (size_t b = 0; b < n_blocks; ++b) total += blocks[b].width;
  size_t ev = 0;
  for (size_t k = 0; k < n_rows; ++k) {
    const int64_t r = rows[k];
    while (ev + 1 < n_events && offsets[ev + 1] <= r) ++ev;  // rows ascending: one pass over events
    float* o = out + k * total;
    for (size_t b = 0; b < n_blocks; ++b) {
      const GatherBlock& g = blocks[b];
      const size_t src = g.per_event ? ev : static_cast<size_t>(r);
      std::memcpy(o, g.data + src * g.width, g.width * sizeof(float));
      o += g.width;
    }
  }
}

size_t rows_at_least(const float* values, size_t n, float threshold, int64_t* out) {
  size_t k = 0;
  for (size_t i = 0; i < n; ++i) {
    out[k] = static_cast<int64_t>(i);  // written always, kept when selected: no branch to mispredict
    k += values[i] >= threshold;
  }
  return k;
}

size_t rows_at_least_within(const float* values, const float* within, size_t n, float threshold, float max_abs,
                            int64_t* out, size_t* n_outside) {
  size_t k = 0, outside = 0;
  for (size_t i = 0; i < n; ++i) {
    const bool above = values[i] >= threshold;
    const bool inside = std::fabs(within[i]) <= max_abs;
    out[k] = static_cast<int64_t>(i);
    k += above & inside;
    outside += above & !inside;
  }
  *n_outside = outside;
  return k;
}

size_t cap_at_ratio(float* values, const float* reference, const int64_t* rows, size_t n_rows, float ratio) {
  size_t capped = 0;
  for (size_t k = 0; k < n_rows; ++k) {
    const int64_t r = rows[k];
    if (!(values[r] <= ratio * reference[r])) {
      values[r] = reference[r];
      ++capped;
    }
  }
  return capped;
}

}  // namespace fw
