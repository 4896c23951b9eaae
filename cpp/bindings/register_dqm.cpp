// DQM kernels (cpp/ecl/dqm.hpp) on numpy arrays, without the GIL.
#include <pybind11/numpy.h>

#include <cstring>
#include <vector>

#include "ecl/dqm.hpp"
#include "register.hpp"

void register_dqm(py::module_& m) {
  m.def(
      "gamma_gamma_masses",
      [](carray<int64_t> offsets, carray<float> energy, carray<float> theta, carray<float> phi, double min_energy,
         int max_per_event) {
        const size_t n_events = checked_offsets(offsets);
        const int64_t* off = offsets.data();
        const int64_t rows = off[n_events];
        for (auto* a : {&energy, &theta, &phi})
          if (a->ndim() != 1 || a->shape(0) < rows) throw py::value_error("cluster arrays shorter than offsets[-1]");
        std::vector<double> out;
        {
          py::gil_scoped_release release;
          ecl::gamma_gamma_masses(off, n_events, energy.data(), theta.data(), phi.data(), min_energy, max_per_event,
                                  out);
        }
        py::array_t<double> a(static_cast<py::ssize_t>(out.size()));
        if (!out.empty()) std::memcpy(a.mutable_data(), out.data(), out.size() * sizeof(double));
        return a;
      },
      py::arg("offsets"), py::arg("energy"), py::arg("theta"), py::arg("phi"), py::arg("min_energy"),
      py::arg("max_per_event"),
      "two-photon masses (GeV) of all pairs among the first max_per_event clusters >= min_energy of each event");
}
