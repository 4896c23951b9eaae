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

size_t select_rows(const float* values, const float* within, const int64_t* offsets, size_t n_events,
                   const uint8_t* event_mask, float min_value, float max_value, float max_abs, int64_t* out,
                   size_t* n_outside) {
  const float hi = max_value > 0 ? max_value : INFINITY;
  size_t k = 0, outside = 0;
  for (size_t e = 0; e < n_events; ++e) {
    if (event_mask && !event_mask[e]) continue;
    const size_t end = static_cast<size_t>(offsets[e + 1]);
    for (size_t i = static_cast<size_t>(offsets[e]); i < end; ++i) {
      const bool above = values[i] >= min_value;
      const bool inside = !within || std::fabs(within[i]) <= max_abs;
      out[k] = static_cast<int64_t>(i);  // written always, kept when selected: no branch to mispredict
      k += above & inside & (values[i] <= hi);
      outside += above & !inside;
    }
  }
  *n_outside = outside;
  return k;
}

size_t event_rows(const int64_t* offsets, size_t n_events, int64_t* out) {
  for (size_t e = 0; e < n_events; ++e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n > 1) return e;
    out[e] = n == 1 ? offsets[e] : -1;
  }
  return n_events;
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
