// Kernels of the ECL data-quality monitoring (ECLDQM): per pair of clusters, and histogram fills.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ecl {

// Two-photon invariant masses (GeV) of all pairs among the first `max_per_event` clusters of each
// event with energy >= min_energy and, when max_abs_time > 0, |time| <= max_abs_time (in time:
// beam-background clusters spread over the whole window; clusters in their stored order, most
// energetic first), from
// the energies and the cluster positions (x, y, z; the photon direction is the position seen
// from the interaction point at the origin): m^2 = 2 E_i E_j (1 - cos(opening angle)).
// Appends to `out`.
void gamma_gamma_masses(const int64_t* offsets, size_t n_events, const float* energy, const float* x,
                        const float* y, const float* z, const float* time, double min_energy,
                        double max_abs_time, int max_per_event, std::vector<double>& out);

// Adds the values to a histogram of nb uniform bins over [lo, hi) with underflow (counts[0]) and
// overflow (counts[nb + 1]): bin floor((v - lo) / (hi - lo) * nb) + 1 computed in double, as
// numpy does it in eclreco.dqm.Histogram1D; NaN goes to the underflow. moments[0] and [1] get the
// sum of the in-range values and of their squares (ROOT's fTsumwx, fTsumwx2: the mean of the
// values, not of the bin centres).
template <class T>
void fill_uniform_histogram(const T* values, size_t n, double lo, double hi, size_t nb, double* counts,
                            double* moments) {
  const double width = hi - lo, bins = static_cast<double>(nb);
  double sx = 0, sxx = 0;
  for (size_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(values[i]);
    const double x = (v - lo) / width * bins;  // numpy's order of operations
    size_t b;
    if (!(x >= 0)) {
      b = 0;
    } else if (x >= static_cast<double>(nb)) {
      b = nb + 1;
    } else {
      b = static_cast<size_t>(x) + 1;
      sx += v;
      sxx += v * v;
    }
    counts[b] += 1.0;
  }
  moments[0] += sx;
  moments[1] += sxx;
}

}  // namespace ecl
