// Gathering selected rows of a collection, with per-event values repeated per row, into one
// dense row-major matrix: the input of a batched inference call, in one pass.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fw {

struct GatherBlock {
  const float* data;  // row-major [n, width]: n = rows of the collection, or events when per_event
  size_t width;
  bool per_event;     // row r takes the values of its event (offsets[e] <= r < offsets[e + 1])
};

// out[k, :] = concatenation over blocks of block[row or event of rows[k], :]; rows ascending and
// < offsets[n_events]; out has n_rows x (sum of widths) floats.
void gather_rows(const int64_t* rows, size_t n_rows, const int64_t* offsets, size_t n_events,
                 const GatherBlock* blocks, size_t n_blocks, float* out);

// The rows of the events e with event_mask[e] != 0 (every event when event_mask is null) whose value is >=
// min_value, <= max_value when max_value > 0, and |within| <= max_abs when within is not null (NaN never
// passes), ascending, in out (which needs room for offsets[n_events] + 1: the slot after the last selected row is
// scratch); returns their number. *n_outside counts the rows of those events >= min_value that |within| alone left
// out (above max_value or not). One branch-free pass: numpy's compare + flatnonzero did less in ~40 µs per batch
// after the clusterizer had run (cold code), against ~3 here.
size_t select_rows(const float* values, const float* within, const int64_t* offsets, size_t n_events,
                   const uint8_t* event_mask, float min_value, float max_value, float max_abs, int64_t* out,
                   size_t* n_outside);

// The row of each event in a collection of at most one row per event (an event-level collection such as
// ECLEventInformation), -1 for an event without one. Returns n_events, or the first event with several rows
// (out is then incomplete).
size_t event_rows(const int64_t* offsets, size_t n_events, int64_t* out);

// values[r] = reference[r] for the rows r where values[r] is not <= ratio * reference[r] (NaN
// included); returns how many: a cap on a correction relative to a reference (ECLEnergyCorrection).
size_t cap_at_ratio(float* values, const float* reference, const int64_t* rows, size_t n_rows, float ratio);

}  // namespace fw
