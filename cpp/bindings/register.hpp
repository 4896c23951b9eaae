// One register_* function per concept; module.cpp calls them all.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "framework/column.hpp"

namespace py = pybind11;

void register_geometry(py::module_& m);
void register_batch(py::module_& m);
void register_framework(py::module_& m);
void register_rawdata(py::module_& m);
void register_clustering(py::module_& m);
void register_dqm(py::module_& m);

// Zero-copy numpy view of a column (shape: rows x inner shape); keeps the buffer alive.
py::array column_view(const fw::Column& c);
// Copies a numpy array into a new column of the array's dtype.
fw::Column column_from_array(const py::array& a);
