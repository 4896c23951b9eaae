// Classical leakage correction (baseline of the CNN): a table of the median response
// R = E_raw / E_true in bins of ln(E_raw / GeV) x position variables, built from simulation by
// eclreco.leakage.build_leakage_table; applied as E = E_raw / R(ln E_raw, position), with
// multilinear interpolation between bin centres (clamped at the edges; nearest bin along
// integer axes such as the theta ring). Binning in raw energy: no iteration is needed.
//
// File format (.npz written by numpy.savez, uncompressed; read here without Python):
//   detector_code  int64 ()      0 belle2-ecl, 1 array30
//   axis_codes     int64 (d,)    variable of each axis (AxisVar below); axis 0 is log_energy_raw
//   axis_linear    int64 (d,)    1: interpolate linearly between centres, 0: nearest centre
//   centers_<k>    float64 (n_k,) bin centres of axis k (increasing)
//   response       float64 (n_0, ..., n_{d-1})  median E_raw / E_true
// Other arrays (axis names, edges, bookkeeping) are ignored by the reader.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace ecl {

enum class AxisVar : int {
  LogEnergyRaw = 0,  // ln(E_raw / GeV)
  Ring = 1,          // seed theta ring (belle2-ecl) / row (array30)
  AbsUVMax = 2,      // max(|local_u|, |local_v|), clipped to 0.5 (array30: distance to the gaps)
  AbsUVMin = 3,      // min(|local_u|, |local_v|), clipped to 0.5
  AbsU = 4,          // |local_u|
  AbsV = 5,          // |local_v|
};

// Minimal reader of .npy arrays inside an uncompressed .npz: name -> (shape, float64 data).
// Numeric dtypes (f4, f8, i1..i8, u1..u8, b1) are converted to double; others are skipped.
struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<double> data;
};
// sha256, when given: set to the SHA-256 of the bytes read (the provenance of what was loaded).
std::map<std::string, NpyArray> read_npz(const std::string& path, std::string* sha256 = nullptr);

class LeakageTable {
 public:
  static constexpr int kMaxAxes = 6;
  LeakageTable() = default;
  static LeakageTable load(const std::string& path);  // throws std::runtime_error
  bool empty() const { return response_.empty(); }
  int detector_code() const { return detector_; }
  const std::string& path() const { return path_; }
  const std::string& sha256() const { return sha256_; }  // of the file's bytes that were loaded

  // Response at the given cluster variables (ring, local_u, local_v as in ECLClusters).
  double response(double energy_raw, int ring, double local_u, double local_v) const;
  double correct(double energy_raw, int ring, double local_u, double local_v) const {
    const double r = response(energy_raw, ring, local_u, local_v);
    return r > 0 ? energy_raw / r : energy_raw;
  }

 private:
  struct Axis {
    AxisVar var;
    bool linear;
    std::vector<double> centers;
  };
  std::string path_, sha256_;
  int detector_ = 0;
  std::vector<Axis> axes_;
  std::vector<int64_t> strides_;
  std::vector<double> response_;
};

}  // namespace ecl
