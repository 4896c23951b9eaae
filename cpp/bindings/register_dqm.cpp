// DQM kernels (cpp/ecl/dqm.hpp) on numpy arrays.
#include <pybind11/numpy.h>

#include <cstring>
#include <vector>

#include "ecl/dqm.hpp"
#include "register.hpp"

void register_dqm(py::module_& m) {
  m.def(
      "gamma_gamma_masses",
      [](const py::object& offsets, const py::object& energy_in, const py::object& x_in, const py::object& y_in,
         const py::object& z_in, const py::object& time_in, py::handle min_energy_in, py::handle max_abs_time_in,
         py::handle max_per_event_in) {
        const double min_energy = checked_float(min_energy_in, "min_energy"),
                     max_abs_time = checked_float(max_abs_time_in, "max_abs_time");
        const int max_per_event = checked_integer<int>(max_per_event_in, "max_per_event");  // True is no count
        const Offsets offs = checked_offsets(offsets);
        const auto energy = checked_reals<float>(energy_in, "energy"), x = checked_reals<float>(x_in, "x"),
                   y = checked_reals<float>(y_in, "y"), z = checked_reals<float>(z_in, "z"),
                   time = checked_reals<float>(time_in, "time");
        const size_t n_events = offs.n_events;
        const int64_t* off = offs.data();
        const int64_t rows = off[n_events];
        for (auto* a : {&energy, &x, &y, &z, &time})
          if (a->shape(0) < rows) throw py::value_error("cluster arrays shorter than offsets[-1]");
        std::vector<double> out;
        {
          py::gil_scoped_release release;
          ecl::gamma_gamma_masses(off, n_events, energy.data(), x.data(), y.data(), z.data(), time.data(),
                                  min_energy, max_abs_time, max_per_event, out);
        }
        py::array_t<double> a(static_cast<py::ssize_t>(out.size()));
        if (!out.empty()) std::memcpy(a.mutable_data(), out.data(), out.size() * sizeof(double));
        return a;
      },
      py::arg("offsets"), py::arg("energy"), py::arg("x"), py::arg("y"), py::arg("z"), py::arg("time"),
      py::arg("min_energy"), py::arg("max_abs_time"), py::arg("max_per_event"),
      "two-photon masses (GeV) of all pairs among the first max_per_event clusters >= min_energy (and |time| <= "
      "max_abs_time when > 0) of each event, photon directions from the cluster positions (x, y, z) seen from the origin");

  m.def(
      "fill_uniform_histogram",
      [](py::array_t<double, py::array::c_style> counts, py::array values, py::handle lo_in, py::handle hi_in,
         py::array_t<double, py::array::c_style> moments) {
        const double lo = checked_float(lo_in, "lo"), hi = checked_float(hi_in, "hi");
        if (counts.ndim() != 1 || counts.shape(0) < 3) throw py::value_error("counts must be 1-d with nb + 2 >= 3 bins");
        if (moments.ndim() != 1 || moments.shape(0) != 2) throw py::value_error("moments must be 1-d with 2 entries");
        if (!(hi > lo)) throw py::value_error("hi must be > lo");
        if (values.ndim() != 1) throw py::value_error("values must be 1-d");
        const size_t nb = static_cast<size_t>(counts.shape(0)) - 2, n = static_cast<size_t>(values.shape(0));
        double* c = counts.mutable_data();
        double* mom = moments.mutable_data();
        auto fill = [&](auto tag) {
          using T = decltype(tag);
          auto v = carray<T>::ensure(values);  // contiguous (a copy only for a strided view)
          // with the GIL held: two threads may fill the same histogram (ECLDQM runs on batches
          // in parallel), and a fill of a few thousand values takes microseconds
          ecl::fill_uniform_histogram(v.data(), n, lo, hi, nb, c, mom);
        };
        const char kind = values.dtype().kind();
        const auto size = values.dtype().itemsize();
        if (kind == 'f' && size == 4)
          fill(float{});
        else if (kind == 'f' && size == 8)
          fill(double{});
        else if (kind == 'i' && size == 4)
          fill(int32_t{});
        else if (kind == 'i' && size == 8)
          fill(int64_t{});
        else
          throw py::type_error("values must be float32, float64, int32 or int64");
      },
      py::arg("counts").noconvert(), py::arg("values"), py::arg("lo"), py::arg("hi"), py::arg("moments").noconvert(),
      "adds values to counts (float64, nb uniform bins over [lo, hi) + underflow and overflow) in place, and the "
      "sum and sum of squares of the in-range values to moments (float64, 2 entries)");
}
