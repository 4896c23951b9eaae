// One register_* function per concept; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_geometry(py::module_& m);
