// One register_* function per concept; module.cpp calls them all.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "ecl/geometry.hpp"
#include "framework/column.hpp"

namespace py = pybind11;

void register_geometry(py::module_& m);
void register_batch(py::module_& m);
void register_framework(py::module_& m);
void register_rawdata(py::module_& m);
void register_clustering(py::module_& m);
void register_dqm(py::module_& m);

// A numpy argument as a C-contiguous array of T (converted when it is not).
template <class T>
using carray = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Row or cell numbers, detector codes (an array, or a list, of integers >= 0; 1-d) as a C-contiguous array of T
// (int32_t, int64_t or uint8_t): the array itself when it is one (no copy), else a converted one. Taken as any array, not as a carray:
// its forcecast truncated a float (rows 1.7 read as 1) and wrapped a value past T (a uint64 above 2**63 - 1, an
// int64 cellId above 2**31 - 1 read as another cell, a detector code 257 as 1). Raises TypeError for a dtype that is not an integer one (an
// empty array may have any), ValueError naming `name` and its first entry that is negative or does not fit T.
template <class T>
carray<T> checked_numbers(py::handle values, const char* name);

// Per-event flags (a bool or integer array, or a list; 1-d) as uint8, nonzero where set: a bool array as is,
// integers as checked_numbers<uint8_t> (forcecast read 0.5 and 256 as 0, a flag not set).
carray<uint8_t> checked_flags(py::handle values, const char* name);

// Real numbers (a float or integer array, or a list; any shape) as a C-contiguous array of F (float or double):
// the array itself when it is one (no copy), else a converted one (another float width, integers, another byte
// order; float32 rounds as numpy's astype, on purpose). Taken as any array, not as a carray: its forcecast read
// strings ('1.5' as 1.5) and bools, and dropped a complex value's imaginary part with only a ComplexWarning.
// Raises TypeError naming `name` and its dtype for any other dtype (an empty array may have any).
template <class F>
carray<F> real_array(py::handle values, const char* name);

// real_array that is 1-d: ValueError naming `name`, the expected shape and the given one when it is not or, for
// length >= 0, has not that many entries (`what`: what the entries are, in that message).
template <class F>
carray<F> checked_reals(py::handle values, const char* name, py::ssize_t length = -1, const char* what = "");

// Per-event offsets of a collection (n_events + 1 entries, non-decreasing from >= 0) as int64: the array
// itself when it is C-contiguous int64 (no copy), else a converted one. Taken as any array (or list), not as a
// carray: its conversion truncated a float (1.7 read as 1) and wrapped a uint64 above 2**63 - 1 to a negative
// value, then named "non-decreasing" values that increase. Raises as checked_numbers, and ValueError naming the
// entries that decrease.
struct Offsets {
  carray<int64_t> array;
  size_t n_events;
  const int64_t* data() const { return array.data(); }
  int64_t back() const { return array.data()[n_events]; }  // the collection's rows
};
Offsets checked_offsets(py::handle offsets, const char* name = "offsets");  // name: in the errors

// A detector argument: its name ('belle2-ecl', 'array30') or code (0, 1; a Python or numpy int). The code is
// range-checked before any cast (pybind11's cast of 257 or -1 to a C++ int type raised "Unable to cast ... to
// C++ type '?'" naming nothing); ValueError naming `name` and the value for an unknown name or code, TypeError
// for anything else (a float, a bool, None).
ecl::Detector detector_arg(py::handle value, const char* name);

// One integer argument (a Python or numpy int) as T (int, int64_t, uint32_t, uint64_t): pybind11's cast read a bool
// as 0 / 1 and refused a value past T with its generic "incompatible function arguments". TypeError naming `name` for
// a bool or a non-integer (1.5 is not truncated), ValueError naming `name`, the value and T's range for a value past T
// (a negative one for an unsigned T). Its steps are those
// of detector_arg's codes and of an event index too (register_batch.cpp), with their own messages.
template <class T>
T checked_integer(py::handle value, const char* name);

// One real-number argument (a Python or numpy int or float, or a 0-d array of one) as a double: pybind11's cast read a
// bool as 0.0 / 1.0 (phi_index_at(1, True) as phi = 1 rad) and refused a string, None or complex value with its
// generic "incompatible function arguments". TypeError naming `name` for a bool, a string, None, a complex value or
// an array of several entries, ValueError naming `name` and the value for an int past a double. NaN and infinities
// pass: what they mean is the function's.
double checked_float(py::handle value, const char* name);

// Zero-copy numpy view of a column (shape: rows x inner shape); keeps the buffer alive.
py::array column_view(const fw::Column& c, bool writable);
// Copies a numpy array into a new column of the array's dtype.
fw::Column column_from_array(const py::array& a);

// Python's bool or numpy's (numpy.bool_, named numpy.bool since numpy 2).
bool is_bool(py::handle v);

// One bool argument (is_bool) as a bool: pybind11's cast read None as False and any number as its truth
// (request_stop(2), install_signal_handlers=0). TypeError naming `name` and the value for anything else.
bool checked_bool(py::handle value, const char* name);

// True while a Python module's event() runs on this thread: a batch may not change its number of
// events there (EventBatch.resize), only in a source's next_batch.
extern thread_local bool in_python_event;
