// Detector description of the two configurations in spec/detector.md: cell numbering, positions,
// (ring, phi) indices and the N1 / NC2 neighbour sets. Positions in cm, angles in rad.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ecl {

enum class Detector : uint8_t { Belle2ECL = 0, Array30 = 1 };

// "belle2-ecl" / "array30"; nullopt for anything else.
std::optional<Detector> detector_from_name(std::string_view name);
const char* detector_name(Detector det);

class Geometry {
 public:
  static const Geometry& get(Detector det);  // built once, immutable, thread-safe to share

  Detector detector;
  std::string name;
  int n_cells = 0;  // cellId runs 1..n_cells
  int n_rings = 0;  // thetaId (belle2-ecl) or row (array30)

  // Per ring.
  std::vector<int> ring_size;         // crystals in the ring (phiId / col count)
  std::vector<int> ring_first_cell;   // cellId of phiId 0
  std::vector<double> ring_theta;     // central theta (belle2-ecl; 0 for array30)
  std::vector<double> ring_theta_lo, ring_theta_hi;
  std::vector<double> ring_front_distance;  // IP to front face along the ring's central theta

  // Per cell, indexed by cellId - 1.
  std::vector<int16_t> cell_ring, cell_phi_index;
  std::vector<double> cell_theta, cell_phi;        // direction of the crystal axis
  std::vector<double> front_x, front_y, front_z;   // centre of the front face, cm
  std::vector<double> dir_x, dir_y, dir_z;         // unit vector of the crystal axis
  // Transverse size of the front face, cm: array30 the crystal (5.5, without the aluminium),
  // belle2-ecl sqrt(theta x phi extent) of the solid-angle cell, the ~1 mm air gap included.
  std::vector<double> width;

  double crystal_length_cm = 30.0;
  double moliere_radius_cm = 3.57;

  // Neighbour sets as CSR over cellId - 1; each list holds cellIds, the cell itself included.
  std::vector<int32_t> n1_offsets, n1_cells;
  std::vector<int32_t> nc2_offsets, nc2_cells;

  // cellId at (ring, phi index): phi wraps for belle2-ecl; 0 when outside (array30 edges, bad ring).
  int cell_id(int ring, int phi_index) const;
  // Phi index in `ring` of the crystal whose phi segment contains `phi` (belle2-ecl); -1 for a ring
  // outside 0..n_rings-1, a phi that is not finite, or array30 (no phi segments).
  int phi_index_at(int ring, double phi) const;
  // Phi index on `ring` nearest in phi to the crystal (ring_from, phi_from); the identity for array30.
  // At an exact tie (the crystal's phi centre on a segment boundary of `ring`: 528 (cell, ring)
  // pairs at the 48/64, 64/96 and 96/144 changes) the result is what the double arithmetic of
  // phi_index_at gives: above for most, below for 69. Only IEEE basic operations (no libm, no
  // a*b+c to contract), so every platform builds the same neighbour lists; the shipped models
  // were trained with these, tests/test_geometry.py accepts either crystal at a tie.
  int nearest_phi_index(int ring_from, int phi_from, int ring) const;
  // Ring whose theta interval contains theta, or -1 in a gap / outside (belle2-ecl).
  int ring_at_theta(double theta) const;

 private:
  explicit Geometry(Detector det);
  void build_belle2();
  void build_array30();
  void build_neighbours();
};

}  // namespace ecl
