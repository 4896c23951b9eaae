#include "ecl/dqm.hpp"

#include <algorithm>
#include <cmath>

namespace ecl {

void gamma_gamma_masses(const int64_t* offsets, size_t n_events, const float* energy, const float* x,
                        const float* y, const float* z, const float* time, double min_energy,
                        double max_abs_time, int max_per_event, std::vector<double>& out) {
  const bool time_cut = max_abs_time > 0;
  // per event: the selected photons' energies and unit vectors, then every pair
  std::vector<double> e, ux, uy, uz;
  const size_t cap = static_cast<size_t>(std::max(max_per_event, 0));
  e.reserve(cap), ux.reserve(cap), uy.reserve(cap), uz.reserve(cap);
  for (size_t ev = 0; ev < n_events; ++ev) {
    e.clear(), ux.clear(), uy.clear(), uz.clear();
    for (int64_t k = offsets[ev]; k < offsets[ev + 1] && e.size() < cap; ++k) {
      if (!(energy[k] >= min_energy)) continue;
      if (time_cut && !(std::fabs(time[k]) <= max_abs_time)) continue;
      // unit vector from the position: one square root instead of four sines and cosines of
      // (theta, phi), which the clusterizer computed from this same position
      const double r = std::sqrt(double(x[k]) * x[k] + double(y[k]) * y[k] + double(z[k]) * z[k]);
      if (!(r > 0)) continue;  // no direction
      e.push_back(energy[k]);
      ux.push_back(x[k] / r);
      uy.push_back(y[k] / r);
      uz.push_back(z[k] / r);
    }
    const size_t n = e.size();
    for (size_t b = 1; b < n; ++b)
      for (size_t a = 0; a < b; ++a) {
        const double cos_open = ux[a] * ux[b] + uy[a] * uy[b] + uz[a] * uz[b];
        out.push_back(std::sqrt(std::max(2.0 * e[a] * e[b] * (1.0 - cos_open), 0.0)));
      }
  }
}

}  // namespace ecl
