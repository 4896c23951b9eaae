#include "register.hpp"

PYBIND11_MODULE(_core, m) {
  m.doc() = "eclreco compiled core (private: use the eclreco package)";
  register_geometry(m);
  register_batch(m);
  register_framework(m);
  register_rawdata(m);
  register_clustering(m);
  register_dqm(m);
}
