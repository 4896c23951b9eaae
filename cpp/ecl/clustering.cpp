#include "ecl/clustering.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ecl {

namespace {
constexpr double kPi = 3.14159265358979323846;
constexpr uint8_t kDigit = 1, kGrow = 2, kSeed = 4, kInTime = 8;

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
}  // namespace

const char* const* cluster_feature_names() { return kFeatureNames; }

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
  if (image_size < 1 || image_size > 41) bad("image_size must be in 1..41");
  if (max_iterations < 1) bad("max_iterations must be >= 1");
  if (!(convergence_cm > 0)) bad("convergence_cm must be > 0");
}

void ClusterOutput::clear() {
  offsets.clear();
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
}

const Clusterer::ReverseN1& Clusterer::reverse_n1(const Geometry& g) {
  static const ReverseN1 rev[2] = {ReverseN1(Geometry::get(Detector::Belle2ECL)),
                                   ReverseN1(Geometry::get(Detector::Array30))};
  return rev[g.detector == Detector::Array30 ? 1 : 0];
}

Clusterer::ReverseN1::ReverseN1(const Geometry& g) {
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
      if (c != a + 1) cells[fill[c - 1]++] = a + 1;
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
  if (parent_.size() < n_digits) {
    for (auto* v : {&parent_, &region_, &pos_in_region_, &region_of_root_, &region_start_,
                    &region_fill_, &members_, &lms_})
      v->resize(n_digits + 1);
    flag_.resize(n_digits + 1);
  }

  // Cell -> digit map and digit classes.
  bool any_seed = false;
  for (int i = 0; i < n; ++i) {
    const int c = cell[i];
    uint8_t f = 0;
    if (c >= 1 && c <= g.n_cells) {
      cell_digit_[c] = static_cast<int16_t>(i);
      const double en = energy[i];
      const bool in_time = p_.time_cut_ns <= 0 || quality[i] != 0 || std::fabs(time[i]) < p_.time_cut_ns;
      if (in_time) f |= kInTime;
      if (en >= t_digit) f |= kDigit;
      if (in_time && en >= t_grow && en >= t_digit) f |= kGrow;
      if (in_time && en >= t_seed && en >= t_grow && en >= t_digit) f |= kSeed, any_seed = true;
    }
    flag_[i] = f;
  }
  auto cleanup = [&] {
    for (int i = 0; i < n; ++i)
      if (cell[i] >= 1 && cell[i] <= g.n_cells) cell_digit_[cell[i]] = -1;
  };
  if (!any_seed) {
    cleanup();
    return;
  }

  // 1. Connected regions: breadth-first from the seeds over the undirected links (growth digit,
  // digit in its N1 list), using the N1 lists and their reverse (which cells list this one).
  const int32_t* n1o = g.n1_offsets.data();
  const int32_t* n1c = g.n1_cells.data();
  const ReverseN1& rev = reverse_n1(g);
  const int32_t* rvo = rev.offsets.data();
  const int32_t* rvc = rev.cells.data();
  int n_reg = 0;
  for (int i = 0; i < n; ++i) region_[i] = -1;
  for (int s0 = 0; s0 < n; ++s0) {
    if (!(flag_[s0] & kSeed) || region_[s0] >= 0) continue;
    const int r = n_reg++;
    int head = 0, tail = 0;
    parent_[tail++] = s0;  // parent_ is the BFS queue
    region_[s0] = r;
    while (head < tail) {
      const int i = parent_[head++];
      const int c = cell[i] - 1;
      if (flag_[i] & kGrow) {
        for (int k = n1o[c]; k < n1o[c + 1]; ++k) {
          const int j = cell_digit_[n1c[k]];
          if (j >= 0 && region_[j] < 0 && (flag_[j] & kDigit)) region_[j] = r, parent_[tail++] = j;
        }
      }
      for (int k = rvo[c]; k < rvo[c + 1]; ++k) {
        const int j = cell_digit_[rvc[k]];
        if (j >= 0 && region_[j] < 0 && (flag_[j] & kGrow)) region_[j] = r, parent_[tail++] = j;
      }
    }
  }
  for (int r = 0; r <= n_reg; ++r) region_start_[r] = 0;
  for (int i = 0; i < n; ++i)
    if (region_[i] >= 0) ++region_start_[region_[i] + 1];
  for (int r = 0; r < n_reg; ++r) region_start_[r + 1] += region_start_[r];
  for (int r = 0; r < n_reg; ++r) region_fill_[r] = region_start_[r];
  for (int i = 0; i < n; ++i)
    if (region_[i] >= 0) {
      pos_in_region_[i] = region_fill_[region_[i]] - region_start_[region_[i]];
      members_[region_fill_[region_[i]]++] = i;
    }

  // 2. Local maxima, grouped by region (lms_ reuses region_fill_ as a cursor).
  int n_lm_total = 0;
  for (int r = 0; r < n_reg; ++r) region_fill_[r] = 0;  // LM count per region
  for (int i = 0; i < n; ++i) {
    if (region_[i] < 0 || !(flag_[i] & kInTime) || energy[i] < t_lm) continue;
    const int c = cell[i] - 1;
    bool is_max = true;
    for (int k = n1o[c]; k < n1o[c + 1] && is_max; ++k) {
      const int j = cell_digit_[n1c[k]];
      if (j >= 0 && j != i && beats(cell, energy, j, i)) is_max = false;
    }
    if (is_max) {
      flag_[i] |= 0x10;
      ++region_fill_[region_[i]];
      ++n_lm_total;
    }
  }
  // Regions without a maximum get their highest seed digit.
  for (int r = 0; r < n_reg; ++r) {
    if (region_fill_[r] > 0) continue;
    int best = -1;
    for (int q = region_start_[r]; q < region_start_[r + 1]; ++q) {
      const int i = members_[q];
      if ((flag_[i] & kSeed) && (best < 0 || beats(cell, energy, i, best))) best = i;
    }
    flag_[best] |= 0x10;
    region_fill_[r] = 1;
    ++n_lm_total;
  }

  cands_.clear();
  img_.clear();
  const double a_over_rm = p_.sharing_a / p_.moliere_radius_cm;
  for (int r = 0; r < n_reg; ++r) {
    const int* mem = members_.data() + region_start_[r];
    const int m = region_start_[r + 1] - region_start_[r];
    if (static_cast<int>(px_.size()) < m) {
      for (auto* v : {&px_, &py_, &pz_, &share_, &ones_}) v->resize(2 * m);
    }
    int K = 0;
    for (int q = 0; q < m; ++q) {
      const int i = mem[q], c = cell[i] - 1;
      px_[q] = g.front_x[c], py_[q] = g.front_y[c], pz_[q] = g.front_z[c];
      if (flag_[i] & 0x10) lms_[K++] = i;
    }
    if (K == 1) {
      for (int q = 0; q < m; ++q) share_[q] = energy[mem[q]], ones_[q] = 1.0;
      make_cluster(g, cell, energy, time, mem, m, share_.data(), ones_.data(), lms_[0], 1, r);
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
      make_cluster(g, cell, energy, time, mem, m, share_.data(), ones_.data(), lms_[k], K, r);
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
  for (int k : order_) {
    const Cand& c = cands_[k];
    out.energy_raw.push_back(static_cast<float>(c.e));
    out.theta.push_back(static_cast<float>(c.theta));
    out.phi.push_back(static_cast<float>(c.phi));
    out.x.push_back(static_cast<float>(c.x));
    out.y.push_back(static_cast<float>(c.y));
    out.z.push_back(static_cast<float>(c.z));
    out.time.push_back(static_cast<float>(c.time));
    out.e1e9.push_back(static_cast<float>(c.e1e9));
    out.e9e21.push_back(static_cast<float>(c.e9e21));
    out.second_moment.push_back(static_cast<float>(c.m2));
    out.lat.push_back(static_cast<float>(c.lat));
    out.local_u.push_back(static_cast<float>(c.u));
    out.local_v.push_back(static_cast<float>(c.v));
    out.weight_sum.push_back(static_cast<float>(c.wsum));
    out.n_crystals.push_back(static_cast<int32_t>(std::lround(c.wsum)));
    out.seed_cell.push_back(c.seed_cell);
    out.ring.push_back(c.ring);
    out.n_maxima.push_back(c.n_max);
    out.region_index.push_back(c.region);
    out.image.insert(out.image.end(), img_.begin() + c.img, img_.begin() + c.img + npix);
    int region_code = 0;
    if (g.detector == Detector::Belle2ECL) region_code = c.ring < 13 ? 0 : c.ring < 59 ? 1 : 2;
    const double f[kNumFeatures] = {c.theta, c.phi, c.u, c.v, c.e, double(c.ring), double(region_code)};
    for (double v : f) out.features.push_back(static_cast<float>(v));
  }
  cleanup();
}

void Clusterer::make_cluster(const Geometry& g, const int32_t* cell, const float* /*energy*/,
                             const float* time, const int* mem, int m, const double* share,
                             const double* w, int seed, int n_max, int region) {
  Cand c{};
  double e = 0, wsum = 0;
  for (int q = 0; q < m; ++q) e += share[q], wsum += w[q];
  c.e = e;
  c.wsum = wsum;
  log_centroid(m, share, e, px_.data(), py_.data(), pz_.data(), p_.log_weight_w0, c.x, c.y, c.z);
  const int sc = cell[seed] - 1;
  c.seed_digit = seed;
  c.seed_cell = cell[seed];
  c.ring = g.cell_ring[sc];
  c.n_max = n_max;
  c.region = region;
  c.time = time[seed];
  const bool belle = g.detector == Detector::Belle2ECL;
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
  auto share_of = [&](int cellid) -> double {
    const int j = cell_digit_[cellid];
    if (j < 0 || region_[j] != region) return 0.0;
    return share[pos_in_region_[j]];
  };
  const double e1 = share[pos_in_region_[seed]];
  double e9 = 0, e21 = 0;
  for (int k = g.n1_offsets[sc]; k < g.n1_offsets[sc + 1]; ++k) e9 += share_of(g.n1_cells[k]);
  for (int k = g.nc2_offsets[sc]; k < g.nc2_offsets[sc + 1]; ++k) e21 += share_of(g.nc2_cells[k]);
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

  // Image.
  const int N = p_.image_size, h = N / 2;
  c.img = img_.size();
  img_.resize(img_.size() + static_cast<size_t>(N) * N, 0.0f);
  float* im = img_.data() + c.img;
  const int seed_phi = g.cell_phi_index[sc];
  for (int dr = 0; dr < N; ++dr) {
    const int rr = c.ring + dr - h;
    if (rr < 0 || rr >= g.n_rings) continue;
    const int centre = g.nearest_phi_index(c.ring, seed_phi, rr);
    for (int dp = 0; dp < N; ++dp) {
      const int id = g.cell_id(rr, centre + dp - h);
      if (id > 0) im[dr * N + dp] = static_cast<float>(share_of(id));
    }
  }
  cands_.push_back(c);
}

}  // namespace ecl
