// ECL clustering on whole batches of digits (plain C++, no framework types): connected regions,
// local maxima, iterative exponential energy sharing between the maxima of a region, cluster
// position (logarithmic weights), shower shapes and N x N cluster images for the CNN.
//
// Algorithm (after basf2's ECLCRFinder, ECLLocalMaximumFinder, ECLSplitterN1, ECLShowerShape;
// own implementation, see also benchmarks/numpy_clustering.py which implements the same):
//
//  Thresholds. All energy thresholds are multiplied by s = sqrt(1 + background_level): the
//  thresholds are placed in units of the per-crystal noise, and beam background adds noise in
//  quadrature; background_level is the background noise variance in units of the electronics
//  noise variance (0: no background, thresholds as given).
//  Time. A digit has a valid time when quality == 0 (good fit); then it is "in time" when
//  |time| < time_cut_ns. Digits without a valid time (quality 1, 2, 3) are accepted as in time,
//  as basf2 does for digits whose time fit failed. time_cut_ns <= 0 disables the time cut.
//
//  1. Connected regions (CR). A digit takes part when E >= digit threshold. It is a growth
//     digit when in time and E >= growth threshold, a seed when in time and E >= seed threshold.
//     Two digits are linked when one of them is a growth (or seed) digit and the other is in its
//     N1 list (3x3 in (ring, phi)); the link is undirected. A CR is a connected component of
//     this graph that contains at least one seed. So digit-level crystals are attached to the
//     region but do not make it grow.
//  2. Local maxima (LM): a CR digit in time with E >= lm threshold that beats every other digit
//     (of the whole event) in its N1 list; "a beats b" is E_a > E_b, or equal energies and the
//     lower cellId (deterministic ties). A CR without such a digit gets its highest seed digit.
//  3. One cluster per LM. The cluster owns the whole CR (not a 5x5 subset): all the read-out
//     energy of a region is distributed to its clusters, the classical leakage correction then
//     corrects for what was not read out. A CR with one LM is one cluster with weight 1 for each
//     digit. A CR with more than max_local_maxima maxima keeps the highest ones (the others are
//     ordinary digits of the region): a noise burst over the whole detector made ~1000 maxima in
//     one region and took 10 s; physics events have at most 16, at 5x the nominal background
//     (basf2's splitter caps them too, maxSplits). With K > 1 maxima, every digit i of the CR is
//     shared with weights
//        w_ik = E_k exp(-a d_ik / R_M) / sum_j E_j exp(-a d_ij / R_M)
//     (a = sharing_a = 2.5, R_M = moliere_radius_cm = 3.57 cm, d_ik = distance between the digit's
//     crystal position and the centroid of cluster k), starting from the LM positions and the LM
//     digit energies; then E_k = sum_i w_ik E_i and the centroids are recomputed (log weights)
//     from the shares w_ik E_i; iterate until no centroid moves by more than convergence_cm
//     (or max_iterations). The cluster properties use the weights of the last iteration.
//  4. Cluster quantities from the shares e_i = w_ik E_i of the cluster's digits:
//     energy_raw = sum e_i; position = sum W_i p_i / sum W_i over the seed's 3 x 3 crystals
//     (position_crystals = 9; 21: its 5 x 5 without corners, 0: all the cluster's digits, which
//     at nominal background lets the region's background digits pull a small cluster by crystals)
//     with W_i = max(0, w0 + ln(e_i / E_pos)), E_pos the sum of those shares (w0 = log_weight_w0
//     = 4; linear energy weights if all W_i vanish), p_i the centre of the crystal's front face
//     (cm); theta, phi of that point seen from the origin (belle2-ecl), for array30 theta = 0 (beam along the crystal axes), phi = atan2(y, x);
//     time = time of the seed (LM) digit, 0 when it has no valid time (quality != 0: taken as in
//     time, above; the bits of its time field mean nothing, wire-format.md);
//     weight_sum = sum_i w_ik, n_crystals = round(weight_sum);
//     local_u, local_v = centroid relative to the centre of the seed crystal in units of the cell
//     size: u along the ring (theta, array30: row = y) direction, v along phi (array30: col = x);
//     +-0.5 are the cell edges (array30: the middle of the aluminium gaps, pitch 6 cm).
//  5. Shower shapes (shares of the cluster, seed = LM crystal):
//     e1e9 = e_seed / sum_{N1(seed)} e,  e9e21 = sum_{N1(seed)} e / sum_{NC2(seed)} e,
//     second_moment = sum e_i r_i^2 / sum e_i (cm^2),
//     lat = sum_{i>=3} e_i r_i^2 / (sum_{i>=3} e_i r_i^2 + r0^2 (e_1 + e_2)), r0 = 5 cm, e_1 >= e_2
//     the two largest shares, r_i the distance of p_i to the centroid transverse to the
//     centroid direction (array30: in the x-y plane).
//  6. Image: an N x N block of the cluster's shares (GeV) around the seed; rows = rings (array30:
//     rows of the array) seed_ring - N/2 ..., columns = phi index (array30: col) centred on the
//     crystal nearest in phi on each ring (as the N1 definition); zero outside the detector.
//     Features (F = kNumFeatures): theta, phi, local_u, local_v, energy_raw, seed ring,
//     detector region (belle2-ecl: 0 forward, 1 barrel, 2 backward; array30: 0).
#pragma once
#include <cstdint>
#include <vector>

#include "ecl/geometry.hpp"

namespace ecl {

struct ClusterParams {
  double seed_energy_gev = 0.010;
  double growth_energy_gev = 0.0015;
  double digit_energy_gev = 0.0005;
  double lm_energy_gev = 0.010;
  double time_cut_ns = 125.0;
  double background_level = 0.0;
  double sharing_a = 2.5;
  double moliere_radius_cm = 3.57;
  double log_weight_w0 = 4.0;
  double convergence_cm = 0.01;
  int max_iterations = 100;
  int max_local_maxima = 30;  // per region: the sharing costs maxima x crystals x iterations
  double lat_r0_cm = 5.0;
  int image_size = 7;
  int position_crystals = 9;  // the seed's 3 x 3 (9) or 21 crystals, or 0: all the cluster's

  double threshold_scale() const;  // sqrt(1 + background_level)
  void validate() const;           // throws std::invalid_argument
};

constexpr int kNumFeatures = 7;
// Names of the feature columns, in order.
const char* const* cluster_feature_names();

// Clusters of a batch, columnar (one entry per cluster; per event sorted by energy_raw
// descending, ties by seed cell). Event i owns clusters offsets[i]..offsets[i+1].
struct ClusterOutput {
  std::vector<int64_t> offsets;
  std::vector<float> energy_raw, theta, phi, x, y, z, time, e1e9, e9e21, second_moment, lat;
  std::vector<float> local_u, local_v, weight_sum;
  std::vector<int32_t> n_crystals, seed_cell, ring, n_maxima, region_index;
  std::vector<float> image;     // rows x image_size x image_size
  std::vector<float> features;  // rows x kNumFeatures
  int image_size = 7;
  // digits ignored because their cellId is outside the detector, their energy or time is not
  // finite, or an earlier digit of the event has their cell (the unpacker never makes them;
  // digits from arrays may hold them): counted, not clustered
  uint64_t invalid_digits = 0;
  size_t size() const { return energy_raw.size(); }
  void clear();
};

// The columns of one value per cluster that ECLClusterizer writes to ECLClusters, in order (after them
// image and features): the one list of their names, which RootOutput's cluster_columns are checked
// against (_core.cluster_columns()). Exactly one of f / i is set: a float32 or an int32 column.
struct ClusterColumn {
  const char* name;
  std::vector<float> ClusterOutput::*f;
  std::vector<int32_t> ClusterOutput::*i;
};
const std::vector<ClusterColumn>& cluster_columns();

// Reusable clustering engine: holds scratch buffers (no allocation per event once warm).
// One instance per thread.
class Clusterer {
 public:
  explicit Clusterer(const ClusterParams& p = {});
  const ClusterParams& params() const { return p_; }

  // Digits of the batch: event i owns entries offsets[i]..offsets[i+1] (sorted by cell within
  // an event is not required). detector: per-event 0 = belle2-ecl, 1 = array30 (nullptr: all
  // belle2-ecl); skip: per-event flag, events with skip[i] != 0 get no clusters (nullptr: none).
  // Appends nothing: `out` is cleared first.
  void run(size_t n_events, const int64_t* offsets, const int32_t* cell, const float* energy,
           const float* time, const uint8_t* quality, const uint8_t* detector, const uint8_t* skip,
           ClusterOutput& out);

 private:
  struct Cand {  // one cluster of the current event before sorting
    double e, x, y, z, theta, phi, time, wsum, u, v, e1e9, e9e21, m2, lat;
    int seed_digit, seed_cell, ring, n_max, region;
    size_t img;  // first pixel of the cluster's image in pix_idx_ / pix_val_
    int n_pix;   // number of non-empty (scattered) pixels
  };
  void event(const Geometry& g, const int32_t* cell, const float* energy, const float* time,
             const uint8_t* quality, size_t n, ClusterOutput& out);
  // w == nullptr: all weights 1 (a region with one maximum).
  void make_cluster(const Geometry& g, const int32_t* cell, const float* time, const uint8_t* quality,
                    const int* members, int m, const double* share, const double* w, int seed, int n_max,
                    int region);
  struct ReverseN1 {
    explicit ReverseN1(const Geometry& g);
    // The cellIds are uint16 (8736 cells): the lists are read for every digit of every region;
    // at half the size more of them stay in cache (int32: ~2 % more time in the clusterizer).
    std::vector<int32_t> offsets;  // CSR over cellId - 1
    std::vector<uint16_t> cells;
    // rev(c) minus N1(c) (non-empty only next to a change of ring size): a growth digit's N1
    // list already reaches every growth digit of rev(c) that is also in N1(c).
    std::vector<int32_t> extra_offsets;
    std::vector<uint16_t> extra_cells;
    // N1(c) without c itself.
    std::vector<int32_t> n1x_offsets;
    std::vector<uint16_t> n1x_cells;
  };
  static const ReverseN1& reverse_n1(const Geometry& g);

  ClusterParams p_;
  // Scratch, indexed by cellId (size of the larger detector + 1), -1 when no digit.
  std::vector<int16_t> cell_digit_;  // int16: fits L1 (an event has at most 8736 digits)
  std::vector<uint8_t> cell_flag_;   // the flags of the digit cell_digit_ maps to (0: no digit)
  // Per digit of the current event.
  std::vector<int32_t> parent_ /* BFS queue, all regions */, pos_in_region_;
  std::vector<uint8_t> flag_;
  std::vector<int32_t> region_start_ /* per region, in parent_ and members_ */, members_, lms_;
  std::vector<int32_t> capped_;  // the maxima of a region above max_local_maxima, to sort
  std::vector<double> px_, py_, pz_;  // positions of the region's digits
  std::vector<double> wts_, share_, ek_, cx_, cy_, cz_, nx_, ny_, nz_, ones_;
  std::vector<Cand> cands_;
  std::vector<int32_t> order_;
  // Images of the event's clusters, sparse: pixel index and value of each member that lies in
  // the N x N block (every other pixel is 0).
  std::vector<int32_t> pix_idx_;
  std::vector<float> pix_val_;
  size_t pix_used_ = 0;
  std::vector<int32_t> row_centre_;
  std::vector<int32_t> cidx_;   // per digit: cellId, or 0 outside the detector
};

}  // namespace ecl
