// The clustering algorithm (cpp/ecl/clustering.hpp) on plain numpy arrays, for tests and
// benchmarks: _core.find_clusters(detector, offsets, cell, energy, time, quality, **params).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "ecl/clustering.hpp"
#include "ecl/digit_summary.hpp"
#include "ecl/leakage.hpp"
#include "register.hpp"

namespace {

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

// The parameters through checked_float / checked_integer<int> (errors name the parameter): pybind11's cast read
// max_iterations=True as 1 iteration and refused 2**40 or 7.9 with "Unable to cast ... to C++ type '?'".
ecl::ClusterParams params_from(const py::kwargs& kw) {
  ecl::ClusterParams p;
  for (auto item : kw) {
    const std::string k = py::str(item.first);
    const char* name = k.c_str();
    auto h = item.second;
    if (k == "seed_energy_gev") p.seed_energy_gev = checked_float(h, name);
    else if (k == "growth_energy_gev") p.growth_energy_gev = checked_float(h, name);
    else if (k == "digit_energy_gev") p.digit_energy_gev = checked_float(h, name);
    else if (k == "lm_energy_gev") p.lm_energy_gev = checked_float(h, name);
    else if (k == "time_cut_ns") p.time_cut_ns = checked_float(h, name);
    else if (k == "background_level") p.background_level = checked_float(h, name);
    else if (k == "sharing_a") p.sharing_a = checked_float(h, name);
    else if (k == "moliere_radius_cm") p.moliere_radius_cm = checked_float(h, name);
    else if (k == "log_weight_w0") p.log_weight_w0 = checked_float(h, name);
    else if (k == "convergence_cm") p.convergence_cm = checked_float(h, name);
    else if (k == "max_iterations") p.max_iterations = checked_integer<int>(h, name);
    else if (k == "max_local_maxima") p.max_local_maxima = checked_integer<int>(h, name);
    else if (k == "lat_r0_cm") p.lat_r0_cm = checked_float(h, name);
    else if (k == "position_crystals") p.position_crystals = checked_integer<int>(h, name);
    else if (k == "image_size") p.image_size = checked_integer<int>(h, name);
    else throw py::type_error("find_clusters: unknown parameter '" + k + "'");
  }
  try {
    p.validate();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  return p;
}

}  // namespace

void register_clustering(py::module_& m) {
  m.def(
      "leakage_correct",
      [](const std::string& table, const py::object& energy_raw_in, const py::object& ring_in,
         const py::object& local_u_in, const py::object& local_v_in) {
        const auto energy_raw = checked_reals<float>(energy_raw_in, "energy_raw");
        const auto ring = checked_numbers<int32_t>(ring_in, "ring");
        const auto local_u = checked_reals<float>(local_u_in, "local_u");
        const auto local_v = checked_reals<float>(local_v_in, "local_v");
        ecl::LeakageTable t;
        try {
          t = ecl::LeakageTable::load(table);
        } catch (const std::runtime_error& e) {
          throw py::value_error(e.what());
        }
        const py::ssize_t n = energy_raw.shape(0);
        if (ring.shape(0) != n || local_u.shape(0) != n || local_v.shape(0) != n)
          throw py::value_error("arrays of different lengths");
        py::array_t<float> out(n);
        float* o = out.mutable_data();
        for (py::ssize_t i = 0; i < n; ++i)
          o[i] = static_cast<float>(t.correct(energy_raw.at(i), ring.at(i), local_u.at(i), local_v.at(i)));
        return out;
      },
      py::arg("table"), py::arg("energy_raw"), py::arg("ring"), py::arg("local_u"), py::arg("local_v"),
      "corrected energies with the C++ leakage table reader/interpolation (cpp/ecl/leakage.hpp)");

  // the out-of-time definition of ECLEventInformation.n_out_of_time_digits (ECLUnpacker)
  m.attr("OUT_OF_TIME_NS") = ecl::kOutOfTimeNs;
  m.def(
      "count_out_of_time_digits",
      [](const py::object& offsets, const py::object& time_in, const py::object& quality_in) {
        const Offsets offs = checked_offsets(offsets);
        const auto time = checked_reals<float>(time_in, "time");
        const auto quality = checked_numbers<uint8_t>(quality_in, "quality");  // forcecast read 256 as 0 (good)
        const size_t n = offs.n_events;
        const int64_t* off = offs.data();
        if (time.shape(0) < off[n] || quality.shape(0) < off[n])
          throw py::value_error("time / quality shorter than offsets[-1]");
        py::array_t<int32_t> out(static_cast<py::ssize_t>(n));
        int32_t* o = out.mutable_data();
        const float* t = time.data();
        const uint8_t* q = quality.data();
        {
          py::gil_scoped_release release;
          for (size_t i = 0; i < n; ++i)
            o[i] = ecl::count_out_of_time(t + off[i], q + off[i], static_cast<size_t>(off[i + 1] - off[i]));
        }
        return out;
      },
      py::arg("offsets"), py::arg("time"), py::arg("quality"),
      "per event, the ECLDigits ECLUnpacker counts into ECLEventInformation.n_out_of_time_digits");

  m.def("cluster_feature_names", [] {
    std::vector<std::string> names;
    for (int k = 0; k < ecl::kNumFeatures; ++k) names.emplace_back(ecl::cluster_feature_names()[k]);
    return names;
  }, "names of the columns of ECLClusters.features");

  m.def("cluster_columns", [] {
    py::dict out;  // insertion order: the clusterizer's
    for (const ecl::ClusterColumn& c : ecl::cluster_columns()) out[py::str(c.name)] = py::str(c.f ? "float32" : "int32");
    return out;
  }, "the ECLClusters columns of one value per cluster that ECLClusterizer writes: name -> numpy dtype name");

  m.def(
      "find_clusters",
      [](py::object detector, const py::object& offsets, const py::object& cell_in, const py::object& energy_in,
         const py::object& time_in, const py::object& quality_in, py::object skip, py::handle repeat_in, const py::kwargs& kw) {
        const ecl::ClusterParams p = params_from(kw);
        const int repeat = checked_integer<int>(repeat_in, "repeat");  // True is no count
        // as _bench_rawdata's repeats: 0 or a negative count ran once, and a benchmark divided by it
        if (repeat < 1) throw py::value_error("repeat must be >= 1, not " + std::to_string(repeat));
        const Offsets offs = checked_offsets(offsets);
        const size_t n_events = offs.n_events;
        const int64_t n_digits = offs.back();
        const auto cell = checked_numbers<int32_t>(cell_in, "cell");
        const auto energy = checked_reals<float>(energy_in, "energy");
        const auto time = checked_reals<float>(time_in, "time");
        const auto quality = checked_numbers<uint8_t>(quality_in, "quality");  // forcecast read 256 as 0 (good)
        for (auto* a : {static_cast<const py::array*>(&cell), static_cast<const py::array*>(&energy),
                        static_cast<const py::array*>(&time), static_cast<const py::array*>(&quality)})
          if (a->shape(0) < n_digits) throw py::value_error("digit arrays shorter than offsets[-1]");
        const int64_t* off = offs.data();
        // Detector: a per-event array (or list) of codes, else a name / code for all events.
        std::vector<uint8_t> det(n_events, 0);
        if (py::isinstance<py::array>(detector) || py::isinstance<py::list>(detector) || py::isinstance<py::tuple>(detector)) {
          const auto a = checked_numbers<uint8_t>(detector, "detector");
          if (static_cast<size_t>(a.shape(0)) != n_events)
            throw py::value_error("detector array must have one entry per event");
          std::memcpy(det.data(), a.data(), n_events);
        } else {
          std::fill(det.begin(), det.end(), static_cast<uint8_t>(detector_arg(detector, "detector")));
        }
        std::vector<uint8_t> sk;
        if (!skip.is_none()) {
          const auto a = checked_flags(skip, "skip");
          if (static_cast<size_t>(a.shape(0)) != n_events)
            throw py::value_error("skip must have one entry per event");
          sk.assign(a.data(), a.data() + n_events);
        }
        ecl::Clusterer clusterer(p);
        ecl::ClusterOutput out;
        {
          py::gil_scoped_release release;
          for (int r = 0; r < repeat; ++r)
            clusterer.run(n_events, off, cell.data(), energy.data(), time.data(), quality.data(), det.data(),
                          sk.empty() ? nullptr : sk.data(), out);
        }
        const auto nc = static_cast<py::ssize_t>(out.size());
        const py::ssize_t N = p.image_size;
        py::dict d;
        d["offsets"] = to_numpy(out.offsets, {static_cast<py::ssize_t>(out.offsets.size())});
#define F1(name) d[#name] = to_numpy(out.name, {nc});
        F1(energy_raw) F1(theta) F1(phi) F1(x) F1(y) F1(z) F1(time) F1(e1e9) F1(e9e21)
        F1(second_moment) F1(lat) F1(local_u) F1(local_v) F1(weight_sum) F1(n_crystals)
        F1(seed_cell) F1(ring) F1(n_maxima) F1(region_index)
#undef F1
        d["image"] = to_numpy(out.image, {nc, N, N});
        d["features"] = to_numpy(out.features, {nc, static_cast<py::ssize_t>(ecl::kNumFeatures)});
        return d;
      },
      py::arg("detector"), py::arg("offsets"), py::arg("cell"), py::arg("energy"), py::arg("time"),
      py::arg("quality"), py::arg("skip") = py::none(), py::arg("repeat") = 1,
      "Cluster a batch of digits (cpp/ecl/clustering.hpp). detector: 'belle2-ecl' / 'array30' / "
      "0 / 1 (an int) or a per-event array (or list) of those codes; skip: per-event flags (bool, or integers: nonzero) of events to "
      "leave out; keyword "
      "parameters as the ECLClusterizer module's (seed_energy_gev, ..., image_size). repeat runs "
      "the clustering that many times (>= 1; benchmarks). Returns a dict of numpy arrays, one entry per "
      "cluster, and 'offsets' (per event).");
}
