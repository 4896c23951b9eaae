#include "ecl/clustering.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace ecl {

namespace {
constexpr double kPi = 3.14159265358979323846;
constexpr uint8_t kDigit = 1, kGrow = 2, kSeed = 4, kInTime = 8, kMax = 0x10, kInRegion = 0x20, kPresent = 0x40;

const char* const kFeatureNames[kNumFeatures] = {"theta", "phi", "local_u", "local_v",
                                                 "energy_raw", "ring", "region"};

inline bool beats(const int32_t* cell, const float* energy, int a, int b) {
  return energy[a] > energy[b] || (energy[a] == energy[b] && cell[a] < cell[b]);
}

inline double wrap_pi(double d) {
  while (d > kPi) d -= 2 * kPi;
  while (d <= -kPi) d += 2 * kPi;
  return d;
}

// Cell j (row-major) of the 5 x 5 grid of rings x phi around a cluster's seed lies in the seed's
// 3 x 3 (n = 9) or in its 21 crystals (n = 21: the 5 x 5 without its corners).
bool in_seed_block(int j, int n) {
  const int dr = std::abs(j / 5 - 2), dp = std::abs(j % 5 - 2);
  return n == 9 ? dr <= 1 && dp <= 1 : !(dr == 2 && dp == 2);
}

// Logarithmically weighted centroid of the shares (see clustering.hpp, step 4).
void log_centroid(int m, const double* share, double etot, const double* px, const double* py,
                  const double* pz, double w0, double& cx, double& cy, double& cz) {
  double sw = 0, sx = 0, sy = 0, sz = 0;
  if (etot > 0) {
    const double cut = etot * std::exp(-w0);  // w > 0 only above this share
    for (int i = 0; i < m; ++i) {
      if (share[i] <= cut) continue;
      const double w = w0 + std::log(share[i] / etot);
      if (w <= 0) continue;
      sw += w;
      sx += w * px[i];
      sy += w * py[i];
      sz += w * pz[i];
    }
  }
  if (sw <= 0) {  // fall back to linear energy weights
    sw = sx = sy = sz = 0;
    for (int i = 0; i < m; ++i) {
      sw += share[i];
      sx += share[i] * px[i];
      sy += share[i] * py[i];
      sz += share[i] * pz[i];
    }
    if (sw <= 0) {
      cx = px[0], cy = py[0], cz = pz[0];
      return;
    }
  }
  cx = sx / sw, cy = sy / sw, cz = sz / sw;
}

// Digit classes (see Clusterer::event) and cellId (0 outside the detector) of n digits; written
// so that the compiler vectorizes it.
int digit_flags(int n, const int32_t* __restrict cell, const float* __restrict energy,
                const float* __restrict time, const uint8_t* __restrict quality, uint8_t* __restrict flag,
                int32_t* __restrict cidx, unsigned n_cells, bool no_time_cut, float f_tcut, float f_digit,
                float f_grow, float f_seed) {
  const uint32_t ntc = no_time_cut ? 1u : 0u;
  int invalid = 0;
  for (int i = 0; i < n; ++i) {
    const int32_t c = cell[i];
    const float en = energy[i];
    // a cellId of the detector, a finite energy and a finite time (NaN compares false; a custom
    // source's NaN time made the digit out of time without a count; raw data has integer times)
    const uint32_t valid = uint32_t(static_cast<uint32_t>(c - 1) < n_cells) &
                           uint32_t(std::fabs(en) <= std::numeric_limits<float>::max()) &
                           uint32_t(std::fabs(time[i]) <= std::numeric_limits<float>::max());
    invalid += static_cast<int>(1u - valid);
    const uint32_t in_time = ntc | uint32_t(quality[i] != 0) | uint32_t(std::fabs(time[i]) < f_tcut);
    const uint32_t f = (in_time * kInTime) | (uint32_t(en >= f_digit) * kDigit) |
                       ((in_time & uint32_t(en >= f_grow)) * kGrow) | ((in_time & uint32_t(en >= f_seed)) * kSeed);
    flag[i] = static_cast<uint8_t>(f * valid);
    cidx[i] = c * static_cast<int32_t>(valid);
  }
  return invalid;
}
}  // namespace

const char* const* cluster_feature_names() { return kFeatureNames; }

const std::vector<ClusterColumn>& cluster_columns() {
  using O = ClusterOutput;
  auto f = [](const char* name, std::vector<float> O::*m) { return ClusterColumn{name, m, nullptr}; };
  auto i = [](const char* name, std::vector<int32_t> O::*m) { return ClusterColumn{name, nullptr, m}; };
  static const std::vector<ClusterColumn> columns = {
      f("energy_raw", &O::energy_raw), f("energy", &O::energy_raw),  // energy: the corrections overwrite it
      f("theta", &O::theta), f("phi", &O::phi), f("x", &O::x), f("y", &O::y), f("z", &O::z), f("time", &O::time),
      i("n_crystals", &O::n_crystals), f("weight_sum", &O::weight_sum), i("seed_cell", &O::seed_cell),
      i("ring", &O::ring), i("n_maxima", &O::n_maxima), i("region_index", &O::region_index),
      f("local_u", &O::local_u), f("local_v", &O::local_v), f("e1e9", &O::e1e9), f("e9e21", &O::e9e21),
      f("second_moment", &O::second_moment), f("lat", &O::lat)};
  return columns;
}

double ClusterParams::threshold_scale() const { return std::sqrt(1.0 + background_level); }

void ClusterParams::validate() const {
  auto bad = [](const std::string& what) { throw std::invalid_argument("clustering: " + what); };
  if (!(seed_energy_gev >= 0 && growth_energy_gev >= 0 && digit_energy_gev >= 0 && lm_energy_gev >= 0))
    bad("energy thresholds must be >= 0");
  if (growth_energy_gev > seed_energy_gev) bad("growth_energy_gev must not exceed seed_energy_gev");
  if (digit_energy_gev > growth_energy_gev) bad("digit_energy_gev must not exceed growth_energy_gev");
  if (!(background_level >= 0)) bad("background_level must be >= 0");
  if (!(sharing_a > 0) || !(moliere_radius_cm > 0)) bad("sharing_a and moliere_radius_cm must be > 0");
  if (!(log_weight_w0 > 0)) bad("log_weight_w0 must be > 0");
  if (image_size < 1 || image_size > 41 || image_size % 2 == 0) bad("image_size must be odd, in 1..41 (the seed at its centre)");
  if (!(lat_r0_cm > 0)) bad("lat_r0_cm must be > 0");
  if (max_iterations < 1) bad("max_iterations must be >= 1");
  if (max_local_maxima < 1) bad("max_local_maxima must be >= 1");
  if (!(convergence_cm > 0)) bad("convergence_cm must be > 0");
  if (position_crystals != 0 && position_crystals != 9 && position_crystals != 21)
    bad("position_crystals must be 0 (all the cluster's crystals), 9 or 21");
}

void ClusterOutput::clear() {
  offsets.clear();
  invalid_digits = 0;
  for (auto* v : {&energy_raw, &theta, &phi, &x, &y, &z, &time, &e1e9, &e9e21, &second_moment, &lat,
                  &local_u, &local_v, &weight_sum, &image, &features})
    v->clear();
  for (auto* v : {&n_crystals, &seed_cell, &ring, &n_maxima, &region_index}) v->clear();
}

Clusterer::Clusterer(const ClusterParams& p) : p_(p) {
  p_.validate();
  const int max_cells = std::max(Geometry::get(Detector::Belle2ECL).n_cells,
                                 Geometry::get(Detector::Array30).n_cells);
  cell_digit_.assign(max_cells + 1, -1);
  cell_flag_.assign(max_cells + 1, 0);
}

const Clusterer::ReverseN1& Clusterer::reverse_n1(const Geometry& g) {
  static const ReverseN1 rev[2] = {ReverseN1(Geometry::get(Detector::Belle2ECL)),
                                   ReverseN1(Geometry::get(Detector::Array30))};
  return rev[g.detector == Detector::Array30 ? 1 : 0];
}

Clusterer::ReverseN1::ReverseN1(const Geometry& g) {
  if (g.n_cells > 65535) throw std::logic_error("clustering: cellIds do not fit the uint16 neighbour lists");
  // rev(c) = cells whose N1 list holds c (c itself excluded).
  std::vector<int32_t> count(g.n_cells + 1, 0);
  for (int a = 0; a < g.n_cells; ++a)
    for (int k = g.n1_offsets[a]; k < g.n1_offsets[a + 1]; ++k)
      if (g.n1_cells[k] != a + 1) ++count[g.n1_cells[k]];
  offsets.assign(g.n_cells + 1, 0);
  for (int c = 0; c < g.n_cells; ++c) offsets[c + 1] = offsets[c] + count[c + 1];
  cells.resize(offsets[g.n_cells]);
  std::vector<int32_t> fill(offsets.begin(), offsets.end() - 1);
  for (int a = 0; a < g.n_cells; ++a)
    for (int k = g.n1_offsets[a]; k < g.n1_offsets[a + 1]; ++k) {
      const int c = g.n1_cells[k];
      if (c != a + 1) cells[fill[c - 1]++] = static_cast<uint16_t>(a + 1);
    }
  extra_offsets.assign(1, 0);
  for (int c = 0; c < g.n_cells; ++c) {
    for (int k = offsets[c]; k < offsets[c + 1]; ++k) {
      const int32_t* b = g.n1_cells.data() + g.n1_offsets[c];
      const int32_t* e = g.n1_cells.data() + g.n1_offsets[c + 1];
      if (std::find(b, e, cells[k]) == e) extra_cells.push_back(cells[k]);
    }
    extra_offsets.push_back(static_cast<int32_t>(extra_cells.size()));
  }
  n1x_offsets.assign(1, 0);
  for (int a = 0; a < g.n_cells; ++a) {
    for (int k = g.n1_offsets[a]; k < g.n1_offsets[a + 1]; ++k)
      if (g.n1_cells[k] != a + 1) n1x_cells.push_back(static_cast<uint16_t>(g.n1_cells[k]));
    n1x_offsets.push_back(static_cast<int32_t>(n1x_cells.size()));
  }
}

void Clusterer::run(size_t n_events, const int64_t* offsets, const int32_t* cell, const float* energy,
                    const float* time, const uint8_t* quality, const uint8_t* detector,
                    const uint8_t* skip, ClusterOutput& out) {
  out.clear();
  out.image_size = p_.image_size;
  out.offsets.push_back(0);
  for (size_t ev = 0; ev < n_events; ++ev) {
    const int64_t b = offsets[ev], e = offsets[ev + 1];
    if ((!skip || !skip[ev]) && e > b) {
      // 0 belle2-ecl, 1 array30 (rawdata's codes); another code (a custom source's) was clustered as
      // belle2-ecl without a word: the event's error instead
      if (detector && detector[ev] > 1)
        throw std::invalid_argument("clustering: unknown detector code " + std::to_string(detector[ev]) +
                                    " (0 belle2-ecl, 1 array30)");
      const Detector det = (detector && detector[ev] == 1) ? Detector::Array30 : Detector::Belle2ECL;
      event(Geometry::get(det), cell + b, energy + b, time + b, quality + b, static_cast<size_t>(e - b), out);
    }
    out.offsets.push_back(static_cast<int64_t>(out.size()));
  }
}

void Clusterer::event(const Geometry& g, const int32_t* cell, const float* energy, const float* time,
                      const uint8_t* quality, size_t n_digits, ClusterOutput& out) {
  if (n_digits > 32767) throw std::invalid_argument("clustering: more than 32767 digits in one event");
  const int n = static_cast<int>(n_digits);
  const double s = p_.threshold_scale();
  const double t_seed = p_.seed_energy_gev * s, t_grow = p_.growth_energy_gev * s,
               t_digit = p_.digit_energy_gev * s, t_lm = p_.lm_energy_gev * s;
  if (parent_.size() < n_digits + 1) {
    for (auto* v : {&parent_, &pos_in_region_, &region_start_, &members_, &lms_})
      v->resize(n_digits + 1);
    flag_.resize(n_digits + 8);
  }

  // Digit classes. The energy and time thresholds are compared in float: for a float x and a
  // double t, x >= t <=> x >= tf and x < t <=> x < tf with tf the smallest float >= t (exact).
  // The validated threshold order (digit <= growth <= seed) makes E >= t_grow imply E >= t_digit.
  auto float_ceil = [](double t) {
    float f = static_cast<float>(t);
    if (static_cast<double>(f) < t) f = std::nextafter(f, std::numeric_limits<float>::infinity());
    return f;
  };
  const float f_seed = float_ceil(t_seed), f_grow = float_ceil(t_grow), f_digit = float_ceil(t_digit);
  const unsigned n_cells = static_cast<unsigned>(g.n_cells);
  const bool no_time_cut = p_.time_cut_ns <= 0;
  const float f_tcut = no_time_cut ? 0.0f : float_ceil(p_.time_cut_ns);
  if (cidx_.size() < n_digits + 1) cidx_.resize(n_digits + 1);
  int32_t* cidx = cidx_.data();
  uint8_t* flag = flag_.data();
  out.invalid_digits += static_cast<uint64_t>(
      digit_flags(n, cell, energy, time, quality, flag, cidx, n_cells, no_time_cut, f_tcut, f_digit, f_grow, f_seed));
  std::memset(flag + n, 0, 8);
  // Cell -> digit map (digits outside the detector write into the dummy slot 0 of the map, never
  // read: neighbour lists hold cellIds >= 1).
  // Beside it, the cell's copy of that digit's flags (kPresent: a digit is there): a neighbour
  // test is then one load, and the ~90 % of neighbour cells without a digit cost no second one.
  // kInRegion is set in both (take()); the other bits do not change while they are read.
  // A second digit of a cell (a custom source's; raw data cannot repeat a cell) is invalid: counted
  // and dropped like a NaN, the first one kept. Mapped as it was, it made two clusters of one crystal.
  int16_t* cdig = cell_digit_.data();
  uint8_t* cflag = cell_flag_.data();
  for (int i = 0; i < n; ++i) {
    if (cidx[i] != 0 && (cflag[cidx[i]] & kPresent)) {
      flag[i] = 0, cidx[i] = 0;
      ++out.invalid_digits;
    }
    cdig[cidx[i]] = static_cast<int16_t>(i), cflag[cidx[i]] = flag[i] | kPresent;
  }
  auto cleanup = [&] {
#pragma GCC unroll 8
    for (int i = 0; i < n; ++i) cdig[cidx[i]] = -1, cflag[cidx[i]] = 0;
  };

  // 1. Connected regions: breadth-first from the seeds over the undirected links (growth digit,
  // digit in its N1 list), using the N1 lists and their reverse (which cells list this one).
  // The queue parent_ runs over all regions: region r is the slice region_start_[r]..[r+1].
  // Flag kInRegion marks the digits already in a region.
  const ReverseN1& rev = reverse_n1(g);
  const int32_t* n1o = rev.n1x_offsets.data();  // N1 lists without the cell itself
  const uint16_t* n1c = rev.n1x_cells.data();
  const int32_t* rvo = rev.offsets.data();
  const uint16_t* rvc = rev.cells.data();
  const int32_t* rxo = rev.extra_offsets.data();
  const uint16_t* rxc = rev.extra_cells.data();
  int32_t* queue = parent_.data();
  int n_reg = 0;
  int tail = 0;
  // takes the digit that cellId id maps to into the region
  auto take = [&](int id) {
    const int j = cdig[id];
    flag[j] |= kInRegion;
    cflag[id] |= kInRegion;
    queue[tail++] = j;
  };
  auto grow_region = [&](int s0) {
    region_start_[n_reg++] = tail;
    int head = tail;
    queue[tail++] = s0;
    flag[s0] |= kInRegion;
    cflag[cell[s0]] |= kInRegion;
    while (head < tail) {
      const int i = queue[head++];
      const int c = cell[i] - 1;
      // A growth digit links to the digits of its N1 list, and (as every digit) to the growth
      // digits whose N1 list holds it (rev); for a growth digit, the growth digits of rev that
      // are also in its N1 list are already taken (kGrow implies kDigit): only the extra part.
      const uint16_t *rb, *re;
      if (flag[i] & kGrow) {
        for (int k = n1o[c]; k < n1o[c + 1]; ++k)
          if ((cflag[n1c[k]] & (kInRegion | kDigit)) == kDigit) take(n1c[k]);
        rb = rxc + rxo[c], re = rxc + rxo[c + 1];
      } else {
        rb = rvc + rvo[c], re = rvc + rvo[c + 1];
      }
      for (const uint16_t* p = rb; p < re; ++p)
        if ((cflag[*p] & (kInRegion | kGrow)) == kGrow) take(*p);
    }
  };
  // Seeds in digit order; the flags are scanned 8 at a time (most digits are no seeds).
  // kInRegion is read again per seed: the regions found before may have taken it.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (int base = 0; base < n; base += 8) {
    uint64_t word;
    std::memcpy(&word, flag + base, 8);  // flag_ has 8 zero bytes after the n digits
    for (uint64_t m = word & (0x0101010101010101ull * kSeed); m; m &= m - 1) {
      const int s0 = base + (__builtin_ctzll(m) >> 3);
      if (!(flag[s0] & kInRegion)) grow_region(s0);
    }
  }
#else
  for (int s0 = 0; s0 < n; ++s0)
    if ((flag[s0] & (kSeed | kInRegion)) == kSeed) grow_region(s0);
#endif
  region_start_[n_reg] = tail;
  if (n_reg == 0) {
    cleanup();
    return;
  }
  // Members of each region in digit order.
  int* members = members_.data();
  for (int r = 0; r < n_reg; ++r) {
    const int b = region_start_[r], e = region_start_[r + 1];
    std::copy(queue + b, queue + e, members + b);
    std::sort(members + b, members + e);
    for (int q = b; q < e; ++q) pos_in_region_[members[q]] = q - b;
  }

  // 2. Local maxima (flag kMax), per region.
  for (int r = 0; r < n_reg; ++r) {
    int count = 0;
    for (int q = region_start_[r]; q < region_start_[r + 1]; ++q) {
      const int i = members[q];
      if (!(flag[i] & kInTime) || energy[i] < t_lm) continue;
      const int c = cell[i] - 1;
      bool is_max = true;
      for (int k = n1o[c]; k < n1o[c + 1] && is_max; ++k) {
        const int j = cdig[n1c[k]];
        if (j >= 0 && beats(cell, energy, j, i)) is_max = false;
      }
      if (is_max) {
        flag[i] |= kMax;
        ++count;
      }
    }
    if (count == 0) {
      // Regions without a maximum get their highest seed digit.
      int best = -1;
      for (int q = region_start_[r]; q < region_start_[r + 1]; ++q) {
        const int i = members[q];
        if ((flag[i] & kSeed) && (best < 0 || beats(cell, energy, i, best))) best = i;
      }
      flag[best] |= kMax;
    } else if (count > p_.max_local_maxima) {
      // keep the highest max_local_maxima (the "beats" order: energy, then the lower cellId)
      capped_.clear();
      for (int q = region_start_[r]; q < region_start_[r + 1]; ++q)
        if (flag[members[q]] & kMax) capped_.push_back(members[q]);
      std::nth_element(capped_.begin(), capped_.begin() + p_.max_local_maxima, capped_.end(),
                       [&](int a, int b) { return beats(cell, energy, a, b); });
      for (size_t k = p_.max_local_maxima; k < capped_.size(); ++k) flag[capped_[k]] &= ~kMax;
    }
  }

  cands_.clear();
  pix_used_ = 0;
  const double a_over_rm = p_.sharing_a / p_.moliere_radius_cm;
  for (int r = 0; r < n_reg; ++r) {
    const int* mem = members + region_start_[r];
    const int m = region_start_[r + 1] - region_start_[r];
    if (static_cast<int>(px_.size()) < m) {
      for (auto* v : {&px_, &py_, &pz_, &share_, &ones_}) v->resize(2 * m);
    }
    int K = 0;
    for (int q = 0; q < m; ++q) {
      const int i = mem[q], c = cell[i] - 1;
      px_[q] = g.front_x[c], py_[q] = g.front_y[c], pz_[q] = g.front_z[c];
      if (flag[i] & kMax) lms_[K++] = i;
    }
    if (K == 1) {
      for (int q = 0; q < m; ++q) share_[q] = energy[mem[q]];
      make_cluster(g, cell, time, quality, mem, m, share_.data(), nullptr, lms_[0], 1, r);
      continue;
    }
    // 3. Iterative exponential sharing between K maxima.
    if (static_cast<int>(ek_.size()) < K)
      for (auto* v : {&ek_, &cx_, &cy_, &cz_, &nx_, &ny_, &nz_}) v->resize(2 * K);
    if (wts_.size() < static_cast<size_t>(m) * K) wts_.resize(2 * static_cast<size_t>(m) * K);
    for (int k = 0; k < K; ++k) {
      const int q = pos_in_region_[lms_[k]];
      cx_[k] = px_[q], cy_[k] = py_[q], cz_[k] = pz_[q];
      ek_[k] = energy[lms_[k]];
    }
    for (int it = 0;; ++it) {
      for (int q = 0; q < m; ++q) {
        double* w = wts_.data() + static_cast<size_t>(q) * K;
        double sum = 0;
        int nearest = 0;
        double dmin = 1e300;
        for (int k = 0; k < K; ++k) {
          const double dx = px_[q] - cx_[k], dy = py_[q] - cy_[k], dz = pz_[q] - cz_[k];
          const double d = std::sqrt(dx * dx + dy * dy + dz * dz);
          if (d < dmin) dmin = d, nearest = k;
          w[k] = ek_[k] * std::exp(-a_over_rm * d);
          sum += w[k];
        }
        if (sum > 0) {
          for (int k = 0; k < K; ++k) w[k] /= sum;
        } else {
          for (int k = 0; k < K; ++k) w[k] = k == nearest ? 1.0 : 0.0;
        }
      }
      double shift = 0;
      for (int k = 0; k < K; ++k) {
        double e = 0;
        for (int q = 0; q < m; ++q) {
          share_[q] = wts_[static_cast<size_t>(q) * K + k] * energy[mem[q]];
          e += share_[q];
        }
        double x, y, z;
        log_centroid(m, share_.data(), e, px_.data(), py_.data(), pz_.data(), p_.log_weight_w0, x, y, z);
        shift = std::max(shift, std::sqrt((x - cx_[k]) * (x - cx_[k]) + (y - cy_[k]) * (y - cy_[k]) +
                                          (z - cz_[k]) * (z - cz_[k])));
        nx_[k] = x, ny_[k] = y, nz_[k] = z;
        ek_[k] = e;
      }
      for (int k = 0; k < K; ++k) cx_[k] = nx_[k], cy_[k] = ny_[k], cz_[k] = nz_[k];
      if (shift < p_.convergence_cm || it + 1 >= p_.max_iterations) break;
    }
    for (int k = 0; k < K; ++k) {
      for (int q = 0; q < m; ++q) {
        ones_[q] = wts_[static_cast<size_t>(q) * K + k];
        share_[q] = ones_[q] * energy[mem[q]];
      }
      make_cluster(g, cell, time, quality, mem, m, share_.data(), ones_.data(), lms_[k], K, r);
    }
  }

  // Sort by energy (descending), ties by seed cell, and append.
  const int nc = static_cast<int>(cands_.size());
  order_.resize(nc);
  for (int k = 0; k < nc; ++k) order_[k] = k;
  std::sort(order_.begin(), order_.end(), [&](int a, int b) {
    const Cand &ca = cands_[a], &cb = cands_[b];
    return ca.e > cb.e || (ca.e == cb.e && ca.seed_cell < cb.seed_cell);
  });
  const size_t npix = static_cast<size_t>(p_.image_size) * p_.image_size;
  const size_t base = out.energy_raw.size();
  for (auto* v : {&out.energy_raw, &out.theta, &out.phi, &out.x, &out.y, &out.z, &out.time, &out.e1e9,
                  &out.e9e21, &out.second_moment, &out.lat, &out.local_u, &out.local_v, &out.weight_sum})
    v->resize(base + nc);
  for (auto* v : {&out.n_crystals, &out.seed_cell, &out.ring, &out.n_maxima, &out.region_index})
    v->resize(base + nc);
  out.image.resize((base + nc) * npix);  // zeros: the images are scattered into it
  out.features.resize((base + nc) * kNumFeatures);
  for (int o = 0; o < nc; ++o) {
    const Cand& c = cands_[order_[o]];
    const size_t row = base + o;
    out.energy_raw[row] = static_cast<float>(c.e);
    out.theta[row] = static_cast<float>(c.theta);
    out.phi[row] = static_cast<float>(c.phi);
    out.x[row] = static_cast<float>(c.x);
    out.y[row] = static_cast<float>(c.y);
    out.z[row] = static_cast<float>(c.z);
    out.time[row] = static_cast<float>(c.time);
    out.e1e9[row] = static_cast<float>(c.e1e9);
    out.e9e21[row] = static_cast<float>(c.e9e21);
    out.second_moment[row] = static_cast<float>(c.m2);
    out.lat[row] = static_cast<float>(c.lat);
    out.local_u[row] = static_cast<float>(c.u);
    out.local_v[row] = static_cast<float>(c.v);
    out.weight_sum[row] = static_cast<float>(c.wsum);
    out.n_crystals[row] = static_cast<int32_t>(std::lround(c.wsum));
    out.seed_cell[row] = c.seed_cell;
    out.ring[row] = c.ring;
    out.n_maxima[row] = c.n_max;
    out.region_index[row] = c.region;
    float* im = out.image.data() + row * npix;
    for (size_t k = c.img; k < c.img + c.n_pix; ++k) im[pix_idx_[k]] = pix_val_[k];
    int region_code = 0;
    if (g.detector == Detector::Belle2ECL) region_code = c.ring < 13 ? 0 : c.ring < 59 ? 1 : 2;
    const double f[kNumFeatures] = {c.theta, c.phi, c.u, c.v, c.e, double(c.ring), double(region_code)};
    float* fo = out.features.data() + row * kNumFeatures;
    for (int k = 0; k < kNumFeatures; ++k) fo[k] = static_cast<float>(f[k]);
  }
  cleanup();
}

void Clusterer::make_cluster(const Geometry& g, const int32_t* cell, const float* time, const uint8_t* quality,
                             const int* mem, int m, const double* share, const double* w, int seed, int n_max,
                             int region) {
  Cand c{};
  double e = 0, wsum = 0;
  if (w) {
    for (int q = 0; q < m; ++q) e += share[q], wsum += w[q];
  } else {
    for (int q = 0; q < m; ++q) e += share[q];
    wsum = m;  // the sum of m ones, exact
  }
  c.e = e;
  c.wsum = wsum;
  const int sc = cell[seed] - 1;
  c.seed_digit = seed;
  c.seed_cell = cell[seed];
  c.ring = g.cell_ring[sc];
  c.n_max = n_max;
  c.region = region;
  c.time = quality[seed] == 0 ? time[seed] : 0.0f;
  const bool belle = g.detector == Detector::Belle2ECL;
  // The block of rings seed_ring - R .. seed_ring + R (R = max(N/2, 2)) around the seed; on
  // each ring the phi index nearest to the seed is the centre (as for the N1 / NC2 lists and the
  // image). A member at phi offset delta from its ring's centre (belle2-ecl: delta taken in
  // (-n/2, n/2], n >= 48 > 2R + 1, so no crystal appears twice) goes into the 5 x 5 grid of the
  // NC2 sums and into the sparse image when in the N x N block; everything else is 0.
  const int N = p_.image_size, h = N / 2;
  const int R = std::max(h, 2);
  if (static_cast<int>(row_centre_.size()) < 2 * R + 1) row_centre_.resize(2 * R + 1);
  const int seed_phi = g.cell_phi_index[sc];
  const int seed_ring_size = g.ring_size[c.ring];
  for (int dr = -R; dr <= R; ++dr) {
    const int rr = c.ring + dr;
    row_centre_[dr + R] = (rr < 0 || rr >= g.n_rings) ? 0
                          : (!belle || g.ring_size[rr] == seed_ring_size)
                              ? seed_phi
                              : g.nearest_phi_index(c.ring, seed_phi, rr);
  }
  int grid_q[25];  // the member in each cell of the 5 x 5 grid around the seed, -1: none
  std::fill(grid_q, grid_q + 25, -1);
  c.img = pix_used_;
  if (pix_idx_.size() < pix_used_ + m) pix_idx_.resize(2 * (pix_used_ + m)), pix_val_.resize(2 * (pix_used_ + m));
  int32_t* pidx = pix_idx_.data();
  float* pval = pix_val_.data();
  size_t np = pix_used_;
  for (int q = 0; q < m; ++q) {
    const int ci = cell[mem[q]] - 1;
    const int ring = g.cell_ring[ci];
    const int dr = ring - c.ring;
    if (dr < -R || dr > R) continue;
    int delta = g.cell_phi_index[ci] - row_centre_[dr + R];
    if (belle) {
      const int nr = g.ring_size[ring];
      delta %= nr;
      if (delta < 0) delta += nr;
      if (2 * delta > nr) delta -= nr;
    }
    if (dr >= -2 && dr <= 2 && delta >= -2 && delta <= 2) grid_q[(dr + 2) * 5 + delta + 2] = q;
    const int row = dr + h, col = delta + h;
    if (row >= 0 && row < N && col >= 0 && col < N) {
      pidx[np] = row * N + col;
      pval[np++] = static_cast<float>(share[q]);
    }
  }
  c.n_pix = static_cast<int>(np - c.img);
  pix_used_ = np;

  // Position: logarithmic weights over the cluster's crystals, or (position_crystals 9 or 21) over
  // the seed's 3 x 3 or 21 crystals only, as basf2 does: a small cluster in a region that holds
  // background digits is otherwise pulled towards them.
  if (p_.position_crystals == 0) {
    log_centroid(m, share, e, px_.data(), py_.data(), pz_.data(), p_.log_weight_w0, c.x, c.y, c.z);
  } else {
    double ps[25], qx[25], qy[25], qz[25], es = 0;
    int k = 0;
    for (int j = 0; j < 25; ++j) {
      if (grid_q[j] < 0 || !in_seed_block(j, p_.position_crystals)) continue;
      const int q = grid_q[j];
      ps[k] = share[q], qx[k] = px_[q], qy[k] = py_[q], qz[k] = pz_[q];
      es += ps[k++];
    }
    log_centroid(k, ps, es, qx, qy, qz, p_.log_weight_w0, c.x, c.y, c.z);
  }
  if (belle) {
    c.theta = std::atan2(std::sqrt(c.x * c.x + c.y * c.y), c.z);
    c.phi = std::atan2(c.y, c.x);
    const int r = c.ring;
    c.u = (c.theta - g.ring_theta[r]) / (g.ring_theta_hi[r] - g.ring_theta_lo[r]);
    c.v = wrap_pi(c.phi - g.cell_phi[sc]) / (2 * kPi / g.ring_size[r]);
  } else {
    const double pitch = g.front_x[1] - g.front_x[0];
    c.theta = 0.0;
    c.phi = std::atan2(c.y, c.x);
    c.u = (c.y - g.front_y[sc]) / pitch;
    c.v = (c.x - g.front_x[sc]) / pitch;
  }

  // Shower shapes.
  const double e1 = share[pos_in_region_[seed]];
  double e9 = 0, e21 = 0;
  // Sums in the order of the neighbour lists (ring-major); the missing cells add +0.
  for (int j = 0; j < 25; ++j) {
    const double ej = grid_q[j] < 0 ? 0.0 : share[grid_q[j]];
    if (in_seed_block(j, 9)) e9 += ej;
    if (in_seed_block(j, 21)) e21 += ej;
  }
  c.e1e9 = e9 > 0 ? e1 / e9 : 0.0;
  c.e9e21 = e21 > 0 ? e9 / e21 : 0.0;
  double nxv = 0, nyv = 0, nzv = 1;
  if (belle) {
    const double norm = std::sqrt(c.x * c.x + c.y * c.y + c.z * c.z);
    nxv = c.x / norm, nyv = c.y / norm, nzv = c.z / norm;
  }
  double sum_er2 = 0;
  int top1 = -1, top2 = -1;
  auto higher = [&](int a, int b) { return share[a] > share[b] || (share[a] == share[b] && cell[mem[a]] < cell[mem[b]]); };
  double r2_top1 = 0, r2_top2 = 0;
  for (int q = 0; q < m; ++q) {
    const double dx = px_[q] - c.x, dy = py_[q] - c.y, dz = pz_[q] - c.z;
    const double dn = dx * nxv + dy * nyv + dz * nzv;
    const double r2 = std::max(0.0, dx * dx + dy * dy + dz * dz - dn * dn);
    sum_er2 += share[q] * r2;
    if (top1 < 0 || higher(q, top1)) {
      top2 = top1, r2_top2 = r2_top1;
      top1 = q, r2_top1 = r2;
    } else if (top2 < 0 || higher(q, top2)) {
      top2 = q, r2_top2 = r2;
    }
  }
  c.m2 = e > 0 ? sum_er2 / e : 0.0;
  if (top2 >= 0) {
    const double num = sum_er2 - share[top1] * r2_top1 - share[top2] * r2_top2;
    const double den = num + p_.lat_r0_cm * p_.lat_r0_cm * (share[top1] + share[top2]);
    c.lat = den > 0 ? std::max(0.0, num) / den : 0.0;
  } else {
    c.lat = 0.0;
  }

  cands_.push_back(c);
}

}  // namespace ecl
