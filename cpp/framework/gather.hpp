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

// Writes the indices of the values >= threshold (NaN never counts) to out, ascending, and returns
// their number: the rows that a batched call takes. One branch-free pass (out needs room for n + 1:
// the slot after the last selected index is scratch); numpy's compare + flatnonzero did the same in
// ~40 µs per batch after the clusterizer had run (cold code), against ~3 here.
size_t rows_at_least(const float* values, size_t n, float threshold, int64_t* out);

// rows_at_least, keeping of those only the rows with |within[i]| <= max_abs (NaN never); returns
// their number and counts in *n_outside the rows >= threshold left out by |within| (a cluster time
// outside the window). Same pass, same room needed in out.
size_t rows_at_least_within(const float* values, const float* within, size_t n, float threshold, float max_abs,
                            int64_t* out, size_t* n_outside);

// values[r] = reference[r] for the rows r where values[r] is not <= ratio * reference[r] (NaN
// included); returns how many: a cap on a correction relative to a reference (ECLEnergyCorrection).
size_t cap_at_ratio(float* values, const float* reference, const int64_t* rows, size_t n_rows, float ratio);

}  // namespace fw
