#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "ecl/geometry.hpp"
#include "register.hpp"

namespace {
// Read-only numpy view of a vector owned by a Geometry singleton (lives for the whole process).
template <class T>
py::array_t<T> view(const std::vector<T>& v, py::handle owner) {
  py::array_t<T> a({static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))},
                   v.data(), owner);
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}
}  // namespace

void register_geometry(py::module_& m) {
  using ecl::Geometry;
  py::class_<Geometry>(m, "Geometry", "Detector description (spec/detector.md); positions in cm")
      .def_static(
          "get",
          // a name or code, parsed as every detector argument is (detector_arg)
          [](py::handle detector) -> const Geometry& { return Geometry::get(detector_arg(detector, "detector")); },
          py::return_value_policy::reference, py::arg("detector"),
          "the detector's geometry: its name ('belle2-ecl', 'array30') or code (0, 1)")
      .def_readonly("name", &Geometry::name)
      .def_readonly("n_cells", &Geometry::n_cells)
      .def_readonly("n_rings", &Geometry::n_rings)
      .def_readonly("crystal_length_cm", &Geometry::crystal_length_cm)
      .def_readonly("moliere_radius_cm", &Geometry::moliere_radius_cm)
#define ECL_VIEW(field) \
  .def_property_readonly(#field, [](py::object self) { return view(self.cast<const Geometry&>().field, self); })
      ECL_VIEW(ring_size) ECL_VIEW(ring_first_cell) ECL_VIEW(ring_theta) ECL_VIEW(ring_theta_lo)
      ECL_VIEW(ring_theta_hi) ECL_VIEW(ring_front_distance) ECL_VIEW(cell_ring) ECL_VIEW(cell_phi_index)
      ECL_VIEW(cell_theta) ECL_VIEW(cell_phi) ECL_VIEW(front_x) ECL_VIEW(front_y) ECL_VIEW(front_z)
      ECL_VIEW(dir_x) ECL_VIEW(dir_y) ECL_VIEW(dir_z) ECL_VIEW(width) ECL_VIEW(n1_offsets)
      ECL_VIEW(n1_cells) ECL_VIEW(nc2_offsets) ECL_VIEW(nc2_cells)
#undef ECL_VIEW
      // the ints through checked_integer, the floats through checked_float: pybind11's cast read True as 1, and 2**40
      // as no overload naming nothing
      .def("cell_id",
           [](const Geometry& g, py::handle ring, py::handle phi_index) {
             return g.cell_id(checked_integer<int>(ring, "ring"), checked_integer<int>(phi_index, "phi_index"));
           },
           py::arg("ring"), py::arg("phi_index"), "cellId at (ring, phi index) (ints); 0 outside the detector")
      .def("phi_index_at",
           [](const Geometry& g, py::handle ring, py::handle phi) {
             return g.phi_index_at(checked_integer<int>(ring, "ring"), checked_float(phi, "phi"));
           },
           py::arg("ring"), py::arg("phi"),
           "phi index of the crystal of `ring` whose segment contains phi (rad, belle2-ecl); -1 for no "
           "such ring, a phi that is not finite, or array30")
      .def("ring_at_theta", [](const Geometry& g, py::handle theta) { return g.ring_at_theta(checked_float(theta, "theta")); },
           py::arg("theta"),
           "ring containing theta, -1 in a gap or outside (belle2-ecl)");
}
