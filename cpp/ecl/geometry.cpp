#include "ecl/geometry.hpp"

#include <cmath>
#include <stdexcept>

namespace ecl {

namespace {
constexpr double kPi = 3.14159265358979323846;
constexpr double kDeg = kPi / 180.0;

struct Part {
  double theta_lo_deg, theta_hi_deg;
  std::vector<int> sizes;
};
// spec/detector.md: crystals per ring and polar coverage of the three parts.
const Part kForward{12.4, 31.4, {48, 48, 64, 64, 64, 96, 96, 96, 96, 96, 96, 144, 144}};
const Part kBarrel{32.2, 128.7, std::vector<int>(46, 144)};
const Part kBackward{130.7, 155.1, {144, 144, 96, 96, 96, 96, 96, 64, 64, 64}};
constexpr double kBarrelRadius = 125.0, kForwardZ = 196.0, kBackwardZ = -102.0;
constexpr double kArrayPitch = 6.0, kArrayCrystal = 5.5;  // cm
constexpr int kArraySide = 30;
}  // namespace

std::optional<Detector> detector_from_name(std::string_view name) {
  if (name == "belle2-ecl") return Detector::Belle2ECL;
  if (name == "array30") return Detector::Array30;
  return std::nullopt;
}

const char* detector_name(Detector det) {
  return det == Detector::Belle2ECL ? "belle2-ecl" : "array30";
}

const Geometry& Geometry::get(Detector det) {
  // Function-local statics: built on first use, thread-safe initialisation.
  static const Geometry belle2(Detector::Belle2ECL);
  static const Geometry array30(Detector::Array30);
  return det == Detector::Belle2ECL ? belle2 : array30;
}

Geometry::Geometry(Detector det) : detector(det), name(detector_name(det)) {
  if (det == Detector::Belle2ECL)
    build_belle2();
  else
    build_array30();
  build_neighbours();
}

void Geometry::build_belle2() {
  int cell = 1;
  for (const Part* part : {&kForward, &kBarrel, &kBackward}) {
    const int n = static_cast<int>(part->sizes.size());
    const double dtheta = (part->theta_hi_deg - part->theta_lo_deg) * kDeg / n;
    for (int k = 0; k < n; ++k) {
      const double lo = part->theta_lo_deg * kDeg + k * dtheta;
      const double theta = lo + 0.5 * dtheta;
      double dist;
      if (part == &kBarrel)
        dist = kBarrelRadius / std::sin(theta);
      else if (part == &kForward)
        dist = kForwardZ / std::cos(theta);
      else
        dist = kBackwardZ / std::cos(theta);
      ring_size.push_back(part->sizes[k]);
      ring_first_cell.push_back(cell);
      ring_theta.push_back(theta);
      ring_theta_lo.push_back(lo);
      ring_theta_hi.push_back(lo + dtheta);
      ring_front_distance.push_back(dist);
      const int nphi = part->sizes[k];
      for (int p = 0; p < nphi; ++p, ++cell) {
        const double phi = (p + 0.5) * 2 * kPi / nphi;
        const double dx = std::sin(theta) * std::cos(phi), dy = std::sin(theta) * std::sin(phi),
                     dz = std::cos(theta);
        cell_ring.push_back(static_cast<int16_t>(ring_size.size() - 1));
        cell_phi_index.push_back(static_cast<int16_t>(p));
        cell_theta.push_back(theta);
        cell_phi.push_back(phi);
        dir_x.push_back(dx);
        dir_y.push_back(dy);
        dir_z.push_back(dz);
        front_x.push_back(dist * dx);
        front_y.push_back(dist * dy);
        front_z.push_back(dist * dz);
        // Transverse size: geometric mean of the theta and phi extents at the front face.
        const double w_theta = dist * dtheta, w_phi = dist * std::sin(theta) * 2 * kPi / nphi;
        width.push_back(std::sqrt(w_theta * w_phi));
      }
    }
  }
  n_rings = static_cast<int>(ring_size.size());
  n_cells = cell - 1;
  if (n_cells != 8736) throw std::logic_error("belle2-ecl geometry does not have 8736 crystals");
}

void Geometry::build_array30() {
  n_rings = kArraySide;
  n_cells = kArraySide * kArraySide;
  for (int row = 0; row < kArraySide; ++row) {
    ring_size.push_back(kArraySide);
    ring_first_cell.push_back(1 + kArraySide * row);
    ring_theta.push_back(0.0);
    ring_theta_lo.push_back(0.0);
    ring_theta_hi.push_back(0.0);
    ring_front_distance.push_back(0.0);
    for (int col = 0; col < kArraySide; ++col) {
      const double x = (col - 14.5) * kArrayPitch, y = (row - 14.5) * kArrayPitch;
      cell_ring.push_back(static_cast<int16_t>(row));
      cell_phi_index.push_back(static_cast<int16_t>(col));
      cell_theta.push_back(0.0);  // the beam runs along +z, the crystal axis too
      cell_phi.push_back(std::atan2(y, x));
      front_x.push_back(x);
      front_y.push_back(y);
      front_z.push_back(0.0);
      dir_x.push_back(0.0);
      dir_y.push_back(0.0);
      dir_z.push_back(1.0);
      width.push_back(kArrayCrystal);
    }
  }
}

int Geometry::cell_id(int ring, int phi_index) const {
  if (ring < 0 || ring >= n_rings) return 0;
  const int n = ring_size[ring];
  if (detector == Detector::Belle2ECL) {
    phi_index %= n;
    if (phi_index < 0) phi_index += n;
  } else if (phi_index < 0 || phi_index >= n) {
    return 0;
  }
  return ring_first_cell[ring] + phi_index;
}

int Geometry::phi_index_at(int ring, double phi) const {
  // Python passes any int and double: a ring past the table, or NaN cast to int, is undefined.
  if (detector != Detector::Belle2ECL || ring < 0 || ring >= n_rings || !std::isfinite(phi)) return -1;
  const int n = ring_size[ring];
  double u = phi / (2 * kPi);
  u -= std::floor(u);
  int p = static_cast<int>(u * n);
  return p >= n ? n - 1 : p;
}

int Geometry::nearest_phi_index(int ring_from, int phi_from, int ring) const {
  if (detector == Detector::Array30 || ring_size[ring_from] == ring_size[ring]) return phi_from;
  return phi_index_at(ring, (phi_from + 0.5) * 2 * kPi / ring_size[ring_from]);
}

int Geometry::ring_at_theta(double theta) const {
  if (detector != Detector::Belle2ECL) return -1;
  for (int r = 0; r < n_rings; ++r)
    if (theta >= ring_theta_lo[r] && theta < ring_theta_hi[r]) return r;
  return -1;
}

void Geometry::build_neighbours() {
  // N1: 3x3 in (ring, phi); NC2: 5x5 minus its corners. On a ring of another size the block is
  // centred on the crystal nearest in phi.
  auto build = [&](int half, bool drop_corners, std::vector<int32_t>& offsets,
                   std::vector<int32_t>& cells) {
    offsets.assign(1, 0);
    for (int c = 0; c < n_cells; ++c) {
      const int ring = cell_ring[c], phi = cell_phi_index[c];
      for (int dr = -half; dr <= half; ++dr) {
        const int r = ring + dr;
        if (r < 0 || r >= n_rings) continue;
        const int centre = nearest_phi_index(ring, phi, r);
        const int nr = ring_size[r];
        for (int dp = -half; dp <= half; ++dp) {
          if (drop_corners && std::abs(dr) == half && std::abs(dp) == half) continue;
          // A ring smaller than the block must not list the same crystal twice.
          if (detector == Detector::Belle2ECL && 2 * half + 1 > nr && (dp < -(nr / 2) || dp > (nr - 1) / 2))
            continue;
          const int id = cell_id(r, centre + dp);
          if (id > 0) cells.push_back(id);
        }
      }
      offsets.push_back(static_cast<int32_t>(cells.size()));
    }
  };
  build(1, false, n1_offsets, n1_cells);
  build(2, true, nc2_offsets, nc2_cells);
}

}  // namespace ecl
