// Kernels of the ECL data-quality monitoring (ECLDQM) that are per pair of clusters.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ecl {

// Two-photon invariant masses (GeV) of all pairs among the first `max_per_event` clusters of each
// event with energy >= min_energy (clusters in their stored order, most energetic first), from
// the energies and the directions (theta, phi) seen from the interaction point:
// m^2 = 2 E_i E_j (1 - cos(opening angle)). Appends to `out`.
void gamma_gamma_masses(const int64_t* offsets, size_t n_events, const float* energy, const float* theta,
                        const float* phi, double min_energy, int max_per_event, std::vector<double>& out);

}  // namespace ecl
