#include <pybind11/stl.h>
#include <algorithm>
#include <functional>
#include <limits>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "framework/event_batch.hpp"
#include "framework/gather.hpp"
#include "register.hpp"

using fw::Collection;
using fw::Column;
using fw::DType;
using fw::EventBatch;

namespace {

py::dtype to_numpy(DType t) { return py::dtype(fw::dtype_name(t)); }

DType from_numpy(const py::dtype& d) {
  const char kind = d.kind();
  const auto size = d.itemsize();
  // float16 and long double would be read as float64 (garbage, and past the end of a 2-byte buffer)
  if (kind == 'f' && (size == 4 || size == 8)) return size == 4 ? DType::F32 : DType::F64;
  if (kind == 'f')
    throw py::type_error("unsupported dtype for a column: " + std::string(py::str(d)) +
                         " (float32 or float64; convert with .astype)");
  if (kind == 'u') return size == 1 ? DType::U8 : size == 2 ? DType::U16 : size == 4 ? DType::U32 : DType::U64;
  if (kind == 'i') return size == 1 ? DType::I8 : size == 2 ? DType::I16 : size == 4 ? DType::I32 : DType::I64;
  if (kind == 'b') return DType::Bool;  // a mask stays a mask (uint8 would index rows 0 and 1)
  throw py::type_error("unsupported dtype for a column: " + std::string(py::str(d)));
}

// A refused scalar argument as the TypeError shows it: its type and repr ("bool True", "str '1'").
std::string type_and_repr(py::handle v) {
  return std::string(py::str(py::type::of(v).attr("__name__"))) + " " + std::string(py::repr(v));
}

// The steps of every integer argument (checked_integer<T>, detector_arg, event_index), each caller giving what its
// messages say: a bool refused (True is no 1), the value read by __index__ (a Python or numpy int, a 0-d integer
// array; 1.5 is not truncated) and compared with [lo, hi] before any cast. TypeError "`name` must be `expected`,
// not <type> <repr>" for anything else; for a value outside, out_of_range(the value as Python writes it, whether it
// is below lo) raises the caller's error. I: long long, or unsigned long long for the values of a uint64 (exp, run).
template <class I>
I checked_integer(py::handle value, const char* name, I lo, I hi, const char* expected,
                  const std::function<void(const std::string& shown, bool below)>& out_of_range) {
  auto refuse_type = [&] {
    throw py::type_error(std::string(name) + " must be " + expected + ", not " + type_and_repr(value));
  };
  py::object i;
  if (PyLong_CheckExact(value.ptr())) {  // a Python int (a bool is a subclass): first, without is_bool's type name
    i = py::reinterpret_borrow<py::object>(value);
  } else {
    if (is_bool(value) || !PyIndex_Check(value.ptr())) refuse_type();
    i = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
    if (!i) {  // an array of more than one entry has __index__ but no single value
      PyErr_Clear();
      refuse_type();
    }
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  bool inside;
  I x = static_cast<I>(v);
  if constexpr (std::is_signed_v<I>) {
    inside = !overflow && v >= lo && v <= hi;
  } else if (overflow > 0) {  // past a long long: maybe within an unsigned one
    x = PyLong_AsUnsignedLongLong(i.ptr());
    inside = !PyErr_Occurred() && x >= lo && x <= hi;
    PyErr_Clear();
  } else {
    inside = !overflow && v >= 0 && x >= lo && x <= hi;
  }
  if (!inside) {
    out_of_range(std::string(py::str(i)), overflow < 0 || (!overflow && (v < 0 || x < lo)));
    throw std::logic_error("checked_integer: out_of_range did not raise");
  }
  return x;
}

// One event index given as a scalar: Python's int or numpy's integer scalars (the elements of
// np.flatnonzero, np.argmax); nullopt for anything else (a list, an array). A bool is refused, not
// read as event 0 or 1 (a mask is an array over the batch), and so is a negative index.
std::optional<size_t> event_index(py::handle v, const char* what) {
  if (is_bool(v))  // its own message: what a bool was meant as
    throw py::type_error(std::string(what) + ": " + std::string(py::repr(v)) +
                         " is not an event index (a mask is a boolean array with one entry per event)");
  if (py::isinstance<py::array>(v) || !PyIndex_Check(v.ptr())) return std::nullopt;
  const std::string w(what);
  return static_cast<size_t>(checked_integer<long long>(v, what, 0, std::numeric_limits<long long>::max(), "an event index",
                                             [&](const std::string& shown, bool below) {
                                               throw py::index_error(w + ": event index " + shown +
                                                                     (below ? " is negative" : " is out of range"));
                                             }));
}

// A column's values as an array: an array, or what numpy makes one of (a list, a tuple); what numpy
// cannot make one of (a ragged list) is numpy's error, naming the column.
py::array column_array(const std::string& name, py::handle value) {
  try {
    return py::module_::import("numpy").attr("asarray")(value);
  } catch (py::error_already_set& e) {
    const std::string msg = "column '" + name + "': " + std::string(py::str(e.value()));
    if (e.matches(PyExc_TypeError)) throw py::type_error(msg);
    throw py::value_error(msg);
  }
}

}  // namespace

py::array column_view(const Column& c, bool writable) {
  std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(c.rows())};
  for (auto d : c.inner_shape()) shape.push_back(static_cast<py::ssize_t>(d));
  auto* holder = new std::shared_ptr<fw::Buffer>(c.shared_buffer());
  py::capsule owner(holder, [](void* p) { delete static_cast<std::shared_ptr<fw::Buffer>*>(p); });
  py::array a(to_numpy(c.dtype()), shape, c.raw(), owner);
  if (!writable) a.attr("setflags")(py::arg("write") = false);
  return a;
}

Column column_from_array(const py::array& input) {
  py::array a = py::array::ensure(input, py::array::c_style);
  if (!a) throw py::type_error("expected an array");
  // the C++ modules read native byte order: a big-endian array ('>f4') is converted, not reinterpreted
  if (a.dtype().attr("byteorder").cast<std::string>() == ">" && a.dtype().itemsize() > 1)
    a = py::array::ensure(a.attr("astype")(a.dtype().attr("newbyteorder")("=")), py::array::c_style);
  if (a.ndim() < 1) throw py::value_error("a column needs at least one dimension");
  std::vector<int64_t> inner;
  for (py::ssize_t k = 1; k < a.ndim(); ++k) inner.push_back(a.shape(k));
  Column c(from_numpy(a.dtype()), inner);
  c.append_bytes(a.data(), static_cast<size_t>(a.shape(0)));
  return c;
}

namespace {

// Whether any of v[0..n) is negative or above T's maximum, in one pass that the compiler vectorizes (find_clusters
// checks every digit's cell on each call): the limit, the smaller of T's and S's maximum, is 2**k - 1, so a value
// (a negative one read as unsigned) is above it when it has a bit above it, and the OR of all values keeps those.
template <class T, class S>
bool any_outside(const S* v, size_t n) {
  using U = std::make_unsigned_t<S>;
  constexpr uint64_t limit = std::min<uint64_t>(std::numeric_limits<T>::max(), std::numeric_limits<S>::max());
  U bits = 0;
  for (size_t i = 0; i < n; ++i) bits |= static_cast<U>(v[i]);
  return bits > limit;
}

// The ValueError for the first entry of v that any_outside refuses.
template <class T, class S>
[[noreturn]] void refuse_first_outside(const S* v, size_t n, const char* name) {
  constexpr auto max = std::numeric_limits<T>::max();  // 2**digits - 1 (int32: 31, uint8: 8)
  const std::string above = " is out of range (above 2**" + std::to_string(std::numeric_limits<T>::digits) + " - 1)";
  for (size_t i = 0; i < n; ++i) {
    const std::string entry = std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(v[i]);
    if constexpr (std::is_signed_v<S>) {
      if (v[i] < 0) throw py::value_error(entry + " is negative");
      if (static_cast<int64_t>(v[i]) > static_cast<int64_t>(max))
        throw py::value_error(entry + above);
    } else if (static_cast<uint64_t>(v[i]) > static_cast<uint64_t>(max)) {
      throw py::value_error(entry + above);
    }
  }
  throw std::logic_error("refuse_first_outside: no entry is outside");
}

template <class T, class S>
void check_range(const py::array& a, const char* name) {
  const S* v = static_cast<const S*>(a.data());
  const size_t n = static_cast<size_t>(a.shape(0));
  if (any_outside<T>(v, n)) refuse_first_outside<T>(v, n, name);
}

}  // namespace

template <class T>
carray<T> checked_numbers(py::handle input, const char* name) {
  // as given, C-contiguous, in its own dtype (a list: numpy's dtype for it, int64 for ints)
  auto a = py::array::ensure(input, py::array::c_style);
  if (!a) throw py::type_error(std::string(name) + " must be an array of integers, not " + std::string(py::repr(input)));
  // read below as native integers: a big-endian array ('>i8') is converted first, not reinterpreted
  if (!a.dtype().attr("isnative").cast<bool>())
    a = py::array::ensure(a.attr("astype")(a.dtype().attr("newbyteorder")("=")), py::array::c_style);
  if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-d, not " + std::to_string(a.ndim()) + "-d");
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u' && a.size() != 0)
    throw py::type_error(std::string(name) + " must be an integer array, not " + std::string(py::str(a.dtype())) +
                         " (convert with .astype(np.int64) where the values are whole)");
  if (kind == 'i' || kind == 'u') {
    const bool s = kind == 'i';
    switch (a.dtype().itemsize()) {
      case 1: s ? check_range<T, int8_t>(a, name) : check_range<T, uint8_t>(a, name); break;
      case 2: s ? check_range<T, int16_t>(a, name) : check_range<T, uint16_t>(a, name); break;
      case 4: s ? check_range<T, int32_t>(a, name) : check_range<T, uint32_t>(a, name); break;
      case 8: s ? check_range<T, int64_t>(a, name) : check_range<T, uint64_t>(a, name); break;
      default: throw py::type_error(std::string(name) + ": unsupported integer dtype " + std::string(py::str(a.dtype())));
    }
  }
  auto out = carray<T>::ensure(a);  // lossless now: every value fits T
  if (!out) throw py::error_already_set();
  return out;
}
template carray<int32_t> checked_numbers<int32_t>(py::handle, const char*);
template carray<int64_t> checked_numbers<int64_t>(py::handle, const char*);
template carray<uint8_t> checked_numbers<uint8_t>(py::handle, const char*);

carray<uint8_t> checked_flags(py::handle input, const char* name) {
  const auto a = py::array::ensure(input, py::array::c_style);
  const char kind = a ? a.dtype().kind() : 0;
  if (kind != 'b') {
    if (a && kind != 'i' && kind != 'u' && a.size() != 0)
      throw py::type_error(std::string(name) + " must be a bool or integer array, not " + std::string(py::str(a.dtype())));
    return checked_numbers<uint8_t>(input, name);
  }
  if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-d, not " + std::to_string(a.ndim()) + "-d");
  auto out = carray<uint8_t>::ensure(a);  // False / True: 0 / 1
  if (!out) throw py::error_already_set();
  return out;
}

template <class F>
carray<F> real_array(py::handle input, const char* name) {
  const auto a = py::array::ensure(input);  // a ragged list is none: named by its type (its repr may be long)
  if (!a)
    throw py::type_error(std::string(name) + " must be an array of numbers, not " +
                         std::string(py::str(py::type::of(input).attr("__name__"))));
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u' && a.size() != 0)
    throw py::type_error(std::string(name) + " must be a float or integer array, not " + std::string(py::str(a.dtype())));
  auto out = carray<F>::ensure(a);  // the array itself for C-contiguous native F
  if (!out) throw py::error_already_set();
  return out;
}
template carray<float> real_array<float>(py::handle, const char*);
template carray<double> real_array<double>(py::handle, const char*);

template <class F>
carray<F> checked_reals(py::handle input, const char* name, py::ssize_t length, const char* what) {
  auto a = real_array<F>(input, name);
  if (a.ndim() != 1 || (length >= 0 && a.shape(0) != length)) {
    const std::string n(name);
    std::string shape = "(";
    for (py::ssize_t d = 0; d < a.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(a.shape(d));
    shape += a.ndim() == 1 ? ",)" : ")";
    if (length < 0) throw py::value_error(n + " must be 1-d, not of shape " + shape);
    throw py::value_error(n + " must have shape (" + std::to_string(length) + ",)" +
                          (*what ? std::string(" (") + what + ")" : std::string()) + ", not " + shape);
  }
  return a;
}
template carray<float> checked_reals<float>(py::handle, const char*, py::ssize_t, const char*);
template carray<double> checked_reals<double>(py::handle, const char*, py::ssize_t, const char*);

Offsets checked_offsets(py::handle input, const char* name) {
  const std::string n(name);
  const auto offsets = py::array::ensure(input);
  if (!offsets) throw py::type_error(n + " must be an array of integers, not " + std::string(py::repr(input)));
  if (offsets.ndim() != 1 || offsets.shape(0) < 1) throw py::value_error(n + " must be 1-d with n_events + 1 entries");
  // every entry, the first too (with no events it is the only one)
  Offsets o{checked_numbers<int64_t>(offsets, name), static_cast<size_t>(offsets.shape(0) - 1)};
  const int64_t* off = o.data();
  for (size_t i = 1; i <= o.n_events; ++i)
    if (off[i] < off[i - 1])
      throw py::value_error(n + " must be non-decreasing: " + n + "[" + std::to_string(i - 1) + "] = " +
                            std::to_string(off[i - 1]) + ", " + n + "[" + std::to_string(i) + "] = " + std::to_string(off[i]));
  return o;
}

ecl::Detector detector_arg(py::handle value, const char* name) {
  const std::string n(name);
  if (py::isinstance<py::str>(value)) {
    const auto d = ecl::detector_from_name(value.cast<std::string>());
    if (!d) throw py::value_error(n + " = " + std::string(py::repr(value)) + " is not a detector name (belle2-ecl or array30)");
    return *d;
  }
  const long long code = checked_integer<long long>(
      value, name, 0, static_cast<long long>(ecl::Detector::Array30),  // Array30: the last code
      "a detector name (belle2-ecl or array30) or code (0 or 1)", [&](const std::string& shown, bool) {
        throw py::value_error(n + " = " + shown + " is not a detector code (0 belle2-ecl, 1 array30)");
      });
  return static_cast<ecl::Detector>(code);
}

template <class T>
T checked_integer(py::handle value, const char* name) {
  using L = std::numeric_limits<T>;
  // a signed T within a long long, an unsigned one within an unsigned long long
  using I = std::conditional_t<L::is_signed, long long, unsigned long long>;
  static_assert(L::digits <= std::numeric_limits<I>::digits, "checked_integer<T>: T's range must fit a 64-bit int");
  return static_cast<T>(checked_integer<I>(value, name, L::min(), L::max(), "an int", [&](const std::string& shown, bool) {
    throw py::value_error(std::string(name) + " = " + shown + " is out of range (" +
                          (L::is_signed ? "-2**" + std::to_string(L::digits) : std::string("0")) + " .. 2**" +
                          std::to_string(L::digits) + " - 1)");
  }));
}
template int checked_integer<int>(py::handle, const char*);
template int64_t checked_integer<int64_t>(py::handle, const char*);
template uint32_t checked_integer<uint32_t>(py::handle, const char*);
template uint64_t checked_integer<uint64_t>(py::handle, const char*);

double checked_float(py::handle value, const char* name) {
  PyObject* v = value.ptr();
  if (PyFloat_Check(v)) return PyFloat_AS_DOUBLE(v);  // float and numpy.float64 (a subclass of it): first, cheaply
  auto refuse_type = [&] {
    throw py::type_error(std::string(name) + " must be a real number (an int or a float), not " + type_and_repr(value));
  };
  if (is_bool(value)) refuse_type();
  if (PyIndex_Check(v)) {  // Python's and numpy's ints, a 0-d integer array
    const auto i = py::reinterpret_steal<py::object>(PyNumber_Index(v));
    if (i) {
      const double d = PyLong_AsDouble(i.ptr());
      if (d == -1.0 && PyErr_Occurred()) {  // past a double: OverflowError
        PyErr_Clear();
        throw py::value_error(std::string(name) + " = " + std::string(py::str(i)) + " is out of range of a float");
      }
      return d;
    }
    PyErr_Clear();  // an array that is not one integer: as numpy reads it, below
  }
  // numpy's other float scalars (float32, float16, longdouble) and a 0-d float array; as numpy reads anything else
  // (a str, None, a complex value, a list), refused
  const auto a = py::array::ensure(value);
  if (!a || a.ndim() != 0 || a.dtype().kind() != 'f') refuse_type();
  const double d = PyFloat_AsDouble(a.ptr());
  if (d == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  return d;
}

bool checked_bool(py::handle value, const char* name) {
  if (!is_bool(value))
    throw py::type_error(std::string(name) + " must be a bool (True or False), not " + type_and_repr(value));
  return PyObject_IsTrue(value.ptr()) == 1;
}

namespace {

// A collection's column, or a KeyError in Python whose message lists the columns there are.
const Column& column_of(const Collection& c, const std::string& name) {
  try {
    return c.column(name);
  } catch (const std::out_of_range& e) {
    throw py::key_error(e.what());
  }
}

// A batch's collection, or a KeyError in Python whose message lists the collections there are.
Collection& collection_of(EventBatch& b, const std::string& name) {
  try {
    return b.get(name);
  } catch (const std::out_of_range& e) {
    throw py::key_error(e.what());
  }
}

}  // namespace

void register_batch(py::module_& m) {
  m.def(
      "gather_rows",
      [](const py::object& rows_in, const py::object& offsets, const py::list& blocks, py::handle per_event_in) {
        const Offsets offs = checked_offsets(offsets);
        const size_t n_events = offs.n_events;
        const auto rows = checked_numbers<int64_t>(rows_in, "rows");
        // each flag through checked_bool: the std::vector<bool> cast read 0, 1 and None as flags
        if (!py::isinstance<py::sequence>(per_event_in) || py::isinstance<py::str>(per_event_in))
          throw py::type_error("per_event must be a sequence of bools (one per block), not " +
                               std::string(py::str(py::type::of(per_event_in).attr("__name__"))));
        const auto per_event_seq = py::reinterpret_borrow<py::sequence>(per_event_in);
        std::vector<bool> per_event;
        for (size_t b = 0; b < per_event_seq.size(); ++b)
          per_event.push_back(checked_bool(per_event_seq[b], ("per_event[" + std::to_string(b) + "]").c_str()));
        if (per_event.size() != blocks.size()) throw py::value_error("one per_event flag per block");
        const int64_t* off = offs.data();
        const int64_t n_coll = off[n_events];
        const int64_t* r = rows.data();
        const size_t n = static_cast<size_t>(rows.shape(0));
        for (size_t k = 0; k < n; ++k)
          if (r[k] < 0 || r[k] >= n_coll || (k && r[k] <= r[k - 1]))
            throw py::value_error("rows must be ascending and within the collection");
        std::vector<carray<float>> keep;
        std::vector<fw::GatherBlock> gb;
        size_t width = 0;
        for (size_t b = 0; b < blocks.size(); ++b) {
          const std::string name = "blocks[" + std::to_string(b) + "]";
          auto a = real_array<float>(blocks[b], name.c_str());
          if (a.ndim() != 2) throw py::value_error(name + " must be 2-d, not " + std::to_string(a.ndim()) + "-d");
          const int64_t need = per_event[b] ? static_cast<int64_t>(n_events) : n_coll;
          if (a.shape(0) != need)
            throw py::value_error(name + " has " + std::to_string(a.shape(0)) + " rows, expected " +
                                  std::to_string(need) + (per_event[b] ? " (events)" : " (collection rows)"));
          gb.push_back({a.data(), static_cast<size_t>(a.shape(1)), per_event[b]});
          width += static_cast<size_t>(a.shape(1));
          keep.push_back(std::move(a));
        }
        py::array_t<float> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(width)});
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          fw::gather_rows(r, n, off, n_events, gb.data(), gb.size(), o);
        }
        return out;
      },
      py::arg("rows"), py::arg("offsets"), py::arg("blocks"), py::arg("per_event"),
      "rows of a collection (ascending) with the per-row blocks and per-event blocks (repeated per row) "
      "side by side: float32 [len(rows), sum of widths], in one pass without the GIL");

  m.def(
      "event_rows",
      [](const py::object& offsets_in) {
        const Offsets offs = checked_offsets(offsets_in);
        py::array_t<int64_t> out(static_cast<py::ssize_t>(offs.n_events));
        const size_t several = fw::event_rows(offs.data(), offs.n_events, out.mutable_data());
        if (several < offs.n_events)
          throw py::value_error("event " + std::to_string(several) + " of the batch has " +
                                std::to_string(offs.data()[several + 1] - offs.data()[several]) + " rows");
        return out;
      },
      py::arg("offsets"),
      "the row of each event in a collection of at most one row per event (an event-level collection), -1 for "
      "an event without one; ValueError naming the first event with several");

  m.def(
      "inference_inputs",
      [](EventBatch& b, const std::string& collection, const py::list& blocks_in, py::handle min_in, py::handle max_in,
         py::handle max_abs_in, py::handle detector_in, const std::string& value_name, const std::string& within_name,
         const std::string& image_name) {
        // everything a batched inference call needs from a batch in one call: a module's selection, per-event
        // values and gathers, as separate numpy steps after the clusterizer (cold caches), cost ~3x the work
        auto view = [](const Collection& c, const std::string& name) { return column_view(column_of(c, name), false); };
        const Collection& cl = collection_of(b, collection);
        const double lo = checked_float(min_in, "min_value"), hi = checked_float(max_in, "max_value");
        const double max_abs = checked_float(max_abs_in, "max_abs_within");
        const size_t n_events = cl.n_events(), n = cl.n_rows();
        if (n_events != b.size())
          throw py::value_error(collection + " has " + std::to_string(n_events) + " events, the batch " +
                                std::to_string(b.size()));
        const int64_t* off = cl.offsets();
        const auto values = checked_reals<float>(view(cl, value_name), value_name.c_str(), n, "one per row");
        carray<float> within;
        if (max_abs > 0) within = checked_reals<float>(view(cl, within_name), within_name.c_str(), n, "one per row");
        // the events worked on: neither rejected nor discarded, and of the detector asked for
        std::vector<uint8_t> mask(n_events, 1);
        const uint8_t* det = b.detector();
        const bool one_detector = !detector_in.is_none();
        const auto code = one_detector ? static_cast<uint8_t>(detector_arg(detector_in, "detector")) : uint8_t{0};
        bool all = true;
        int found = -1;  // the detector of the events worked on; -2: several
        for (size_t e = 0; e < n_events; ++e) {
          mask[e] = !b.skips(e) && (!one_detector || det[e] == code);
          all = all && mask[e];
          if (mask[e] && found != det[e]) found = found == -1 ? det[e] : -2;
        }
        // blocks: (collection, column) pairs; "" for a column of `collection` itself (per cluster), else the
        // column of an event-level collection (at most one row per event) repeated for each cluster of the event
        std::vector<carray<float>> keep;
        std::vector<std::vector<float>> per_event_values;
        std::vector<fw::GatherBlock> gb;
        size_t width = 0;
        for (auto item : blocks_in) {
          const auto pair = item.cast<std::pair<std::string, std::string>>();
          if (pair.first.empty()) {
            const Column& c = column_of(cl, pair.second);
            auto a = real_array<float>(column_view(c, false), pair.second.c_str());
            gb.push_back({a.data(), c.row_width(), false});
            width += c.row_width();
            keep.push_back(std::move(a));
            continue;
          }
          const std::string label = pair.first + "." + pair.second;
          if (!b.has(pair.first))
            throw py::value_error(label + " is needed, and the batch has no " + pair.first);
          const Collection& ev = collection_of(b, pair.first);
          if (ev.n_events() != n_events)
            throw py::value_error(pair.first + " has " + std::to_string(ev.n_events()) + " events, the batch " +
                                  std::to_string(n_events));
          std::vector<int64_t> rows(n_events);
          const size_t several = fw::event_rows(ev.offsets(), n_events, rows.data());
          if (several < n_events)  // the message of framework.per_event_value
            throw py::value_error(label + " has one row per event, but event " + std::to_string(several) +
                                  " of the batch has " +
                                  std::to_string(ev.offsets()[several + 1] - ev.offsets()[several]) + " rows");
          const auto a = checked_reals<float>(view(ev, pair.second), label.c_str(), ev.n_rows(), "one per row");
          std::vector<float> v(n_events);
          size_t lacking = 0, first = 0;
          for (size_t e = 0; e < n_events; ++e) {
            v[e] = rows[e] < 0 ? std::numeric_limits<float>::quiet_NaN() : a.data()[rows[e]];
            if (rows[e] < 0 && mask[e] && off[e + 1] > off[e] && !lacking++) first = e;
          }
          if (lacking)  // an event the unpacker failed on has no row, and no clusters either
            throw py::value_error(std::to_string(lacking) + " event(s) with rows in " + collection +
                                  " have no row in " + pair.first + " (first: event " + std::to_string(first) +
                                  " of the batch)");
          per_event_values.push_back(std::move(v));
          gb.push_back({per_event_values.back().data(), 1, true});
          width += 1;
        }
        const Column& image_col = column_of(cl, image_name);
        const auto image = real_array<float>(column_view(image_col, false), image_name.c_str());
        const size_t image_width = image_col.row_width();
        const fw::GatherBlock ib{image.data(), image_width, false};
        py::array_t<int64_t> rows_out(static_cast<py::ssize_t>(n + 1));
        int64_t* r = rows_out.mutable_data();
        size_t k, outside;
        {
          py::gil_scoped_release release;
          k = fw::select_rows(values.data(), max_abs > 0 ? within.data() : nullptr, off, n_events,
                              all ? nullptr : mask.data(), static_cast<float>(lo), static_cast<float>(hi),
                              static_cast<float>(max_abs), r, &outside);
        }
        std::vector<py::ssize_t> image_shape{static_cast<py::ssize_t>(k)};
        for (int64_t d : image_col.inner_shape()) image_shape.push_back(static_cast<py::ssize_t>(d));
        py::array_t<float> features({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(width)});
        py::array_t<float> images(image_shape);
        float* fo = features.mutable_data();
        float* io = images.mutable_data();
        {
          py::gil_scoped_release release;
          fw::gather_rows(r, k, off, n_events, gb.data(), gb.size(), fo);
          fw::gather_rows(r, k, off, n_events, &ib, 1, io);
        }
        return py::make_tuple(rows_out[py::slice(0, static_cast<py::ssize_t>(k), 1)], outside, images, features,
                              found == -2 ? -1 : found);
      },
      py::arg("batch"), py::arg("collection"), py::arg("blocks"), py::arg("min_value"), py::arg("max_value"),
      py::arg("max_abs_within"), py::arg("detector") = py::none(), py::arg("value") = "energy_raw",
      py::arg("within") = "time", py::arg("image") = "image",
      "(rows, n_outside, images, features, detector) of a batched inference over `collection`: the rows of the events "
      "worked on (not rejected or discarded; of `detector` unless None) whose `value` is >= min_value, <= "
      "max_value when that is > 0, and |`within`| <= max_abs_within when that is > 0 (n_outside: those >= "
      "min_value left out by |within|); their `image` rows, and their `blocks` side by side, float32: "
      "(collection, column) pairs, '' for a column of `collection`, else an event-level collection's column "
      "(at most one row per event; an event with rows in `collection` and none there is an error); detector: the "
      "code of the events worked on, -1 when they are of several (none: -1 too). One call, without the GIL for "
      "the passes");

  m.def(
      "write_rows",
      [](Collection& c, const std::string& column, const py::object& rows_in, const py::list& parts,
         py::handle max_ratio_in) {
        // the new values of a batched inference written back in one call: as numpy steps (a copy, a scatter per
        // call, the cap, the column set) after onnxruntime, with cold caches, they cost ~4x the work
        const double max_ratio = checked_float(max_ratio_in, "max_ratio");
        const auto rows = checked_numbers<int64_t>(rows_in, "rows");
        const Column& col = column_of(c, column);
        if (col.dtype() != DType::F32 || col.row_width() != 1)
          throw py::type_error("column '" + column + "' must hold one float32 per row to be written, not " +
                               std::to_string(col.row_width()) + " " + fw::dtype_name(col.dtype()));
        const int64_t n = static_cast<int64_t>(col.rows());
        const int64_t* r = rows.data();
        const size_t nr = static_cast<size_t>(rows.shape(0));
        for (size_t k = 0; k < nr; ++k)
          if (r[k] < 0 || r[k] >= n) throw py::index_error("rows out of range");
        std::vector<carray<float>> values;
        size_t total = 0;
        for (size_t i = 0; i < parts.size(); ++i) {
          const std::string name = "parts[" + std::to_string(i) + "]";
          values.push_back(checked_reals<float>(parts[i], name.c_str()));
          total += static_cast<size_t>(values.back().shape(0));
        }
        if (total != nr)
          throw py::value_error("parts hold " + std::to_string(total) + " values for " + std::to_string(nr) + " rows");
        Column out = col;  // shares the buffer: the batch as it was stays intact (the processor's snapshot)
        float* v = out.values<float>();  // detaches: a copy
        const float* before = col.values<float>();  // const: no detach
        size_t capped = 0;
        {
          py::gil_scoped_release release;
          size_t k = 0;
          for (const auto& part : values)
            for (py::ssize_t j = 0; j < part.shape(0); ++j) v[r[k++]] = part.data()[j];
          if (max_ratio > 0) capped = fw::cap_at_ratio(v, before, r, nr, static_cast<float>(max_ratio));
        }
        c.set_column(column, std::move(out));
        return capped;
      },
      py::arg("collection"), py::arg("column"), py::arg("rows"), py::arg("parts"), py::arg("max_ratio"),
      "replaces the float32 `column` of a collection by a copy with the values of `parts` (1-d, concatenated: one "
      "per row of `rows`) written at `rows`; where max_ratio > 0, a value not <= max_ratio x the column's value "
      "before (NaN included) keeps that value. Returns how many kept it");

  py::class_<Collection>(m, "Collection", "Columns with per-event offsets (event i owns rows offsets[i]:offsets[i+1])")
      // read-only: the C++ modules trust the offsets (rows past a column's end would be read)
      .def_property_readonly("offsets", [](const Collection& c) { return column_view(c.offsets_column(), false); })
      .def_property_readonly("n_rows", &Collection::n_rows)
      .def("columns", [](const Collection& c) {
        std::vector<std::string> names;
        for (const auto& [k, v] : c.columns()) names.push_back(k);
        return names;
      })
      .def("__contains__", &Collection::has)
      // read-only, zero-copy: a module that raises is re-run on the batch as it was before its call (the
      // processor keeps that snapshot, sharing the buffers), which an in-place write would change too
      .def("__getitem__", [](const Collection& c, const std::string& name) {
        return column_view(column_of(c, name), false);
      }, "a read-only view of a column (no copy); write by assigning a new array: c[name] = c[name] * 2")
      .def("__setitem__", [](Collection& c, const std::string& name, const py::object& value) {
        py::array a = column_array(name, value);
        if (a.ndim() == 0)
          throw py::value_error("column '" + name + "' needs one value per row (" +
                                (c.name().empty() ? std::string("the collection") : "collection '" + c.name() + "'") +
                                " has " + std::to_string(c.n_rows()) + "), not a scalar");
        c.set_column(name, column_from_array(a));
      }, "add or replace a column (copied) from an array or a list; its length must be the collection's row count");

  py::class_<EventBatch>(m, "EventBatch", "A batch of events in columnar form")
      // the counts through checked_integer: pybind11's cast read EventBatch(True) as one event
      .def(py::init([](py::handle n) { return EventBatch(checked_integer<uint64_t>(n, "n_events")); }),
           py::arg("n_events") = 0)
      .def("__len__", &EventBatch::size)
      .def("resize", [](EventBatch& b, py::handle n_in) {
        const size_t n = checked_integer<uint64_t>(n_in, "n_events");
        // a module that adds or drops events would leave the collections' offsets behind (and
        // the accounting: received = processed + rejected); sources resize before adding any
        if (n != b.size() && (in_python_event || !b.collections().empty()))
          throw py::value_error("EventBatch.resize: a module cannot add or drop events (use reject); a source "
                                "sizes its batch in next_batch, before it adds collections");
        b.resize(n);
      }, py::arg("n_events"))
      .def_property("sequence", [](const EventBatch& b) { return b.sequence; },
                    [](EventBatch& b, py::handle v) { b.sequence = checked_integer<uint64_t>(v, "sequence"); })
  // writable for a source (next_batch) and for code that builds a batch; read-only in a module's event():
  // the event's identity is what its errors, rejections and outputs are keyed by
#define META(field, T)                                                                         \
  .def_property_readonly(#field, [](EventBatch& b) { return column_view(*b.metadata().at(#field), !in_python_event); })
      META(exp, uint64_t) META(run, uint64_t) META(evt, uint32_t) META(time_ns, int64_t) META(detector, uint8_t)
#undef META
      // read-only: an event is rejected or flagged with its reason (reject, flag_error), so that it is counted
      .def_property_readonly("error_flags", [](EventBatch& b) { return column_view(*b.metadata().at("error_flags"), false); })
      .def("collections", [](const EventBatch& b) {
        std::vector<std::string> names;
        for (const auto& [k, v] : b.collections()) names.push_back(k);
        return names;
      })
      .def("__contains__", &EventBatch::has)
      .def("__getitem__", [](EventBatch& b, const std::string& name) -> Collection& { return collection_of(b, name); },
           py::return_value_policy::reference_internal)
      .def("add_collection", [](EventBatch& b, const std::string& name, const py::object& offsets,
                                const py::dict& columns) -> Collection& {
        const Offsets offs = checked_offsets(offsets);  // (held: a converted copy lives as long as it)
        if (offs.n_events != b.size()) throw py::value_error("offsets must have len(batch) + 1 entries");
        const int64_t* off = offs.data();
        std::vector<int64_t> counts(b.size());
        for (size_t i = 0; i < b.size(); ++i) counts[i] = off[i + 1] - off[i];
        Collection& c = b.add(name);
        c.set_counts(counts);
        for (auto item : columns) {
          const std::string col = py::str(item.first);
          c.set_column(col, column_from_array(column_array(col, item.second)));
        }
        return c;
      }, py::arg("name"), py::arg("offsets"), py::arg("columns"), py::return_value_policy::reference_internal,
         "add a collection from per-event offsets and a dict of equally long arrays (copied)")
      .def("remove", &EventBatch::remove)
      .def("reject", [](EventBatch& b, py::object index, const std::string& reason, const std::string& detail) {
        const auto i = event_index(index, "reject");
        if (!i) throw py::type_error("reject: takes one event index, not " + std::string(py::repr(index)));
        b.reject(*i, reason, detail);
      }, py::arg("index"), py::arg("reason"), py::arg("detail") = "")
      // the index as reject's (event_index): pybind11's cast read flag_error(True, ...) as event 1
      .def("flag_error", [](EventBatch& b, py::object index, const std::string& message) {
        const auto i = event_index(index, "flag_error");
        if (!i) throw py::type_error("flag_error: takes one event index, not " + std::string(py::repr(index)));
        b.flag_error(*i, message);
      }, py::arg("index"), py::arg("message"))
      .def("rejections", [](const EventBatch& b) {
        py::dict d;
        for (const auto& [i, r] : b.rejections()) d[py::int_(i)] = py::make_tuple(r.reason, r.detail);
        return d;
      }, "{event index: (reason, detail)} of the rejected events")
      .def("discard", [](EventBatch& b, py::object which, const std::string& reason) {
        // an index, a list of indices or a boolean mask over the batch (what a numpy cut gives)
        if (const auto i = event_index(which, "discard")) {
          b.discard(*i, reason);
          return;
        }
        py::array a = py::array::ensure(which);
        if (!a || a.ndim() != 1) throw py::type_error("discard: takes an event index, a list of indices or a 1-d boolean mask");
        if (a.dtype().kind() == 'b') {
          if (static_cast<size_t>(a.shape(0)) != b.size())
            throw py::value_error("discard: the mask has " + std::to_string(a.shape(0)) + " entries for a batch of " +
                                  std::to_string(b.size()) + " events");
          auto m = py::array_t<bool, py::array::forcecast>(a);
          auto v = m.unchecked<1>();
          for (size_t i = 0; i < b.size(); ++i)
            if (v(i)) b.discard(i, reason);
          return;
        }
        if (a.dtype().kind() != 'i' && a.dtype().kind() != 'u' && a.size() != 0)
          throw py::type_error("discard: indices must be integers or the mask booleans, not " +
                               std::string(py::str(a.dtype())));
        // as given: a forcecast to int64 read a uint64 2**64 - 1 as -1 and named that
        carray<int64_t> idx;
        try {
          idx = checked_numbers<int64_t>(a, "events");
        } catch (const py::value_error& e) {  // an index no batch has: IndexError, as for a single index
          throw py::index_error(std::string("discard: ") + e.what());
        }
        auto v = idx.unchecked<1>();
        std::vector<int64_t> sorted(idx.data(), idx.data() + v.shape(0));
        std::sort(sorted.begin(), sorted.end());
        if (auto twice = std::adjacent_find(sorted.begin(), sorted.end()); twice != sorted.end())
          // what a 0/1 integer mask gives (events 0 and 1 discarded): refused, not read as indices
          throw py::value_error("discard: event index " + std::to_string(*twice) + " is given twice; a mask must be "
                                "boolean (mask.astype(bool)), indices distinct");
        // checked before any event is discarded: a refused call leaves the batch as it was (none is negative)
        if (!sorted.empty() && static_cast<size_t>(sorted.back()) >= b.size())
          throw py::index_error("discard: event index " + std::to_string(sorted.back()) + " is out of range for a "
                                "batch of " + std::to_string(b.size()) + " events");
        for (py::ssize_t k = 0; k < v.shape(0); ++k) b.discard(static_cast<size_t>(v(k)), reason);
      }, py::arg("events"), py::arg("reason"),
         "an event filter's decision: these events (an index, indices or a boolean mask) are counted as processed "
         "and discarded with `reason`, and later modules and outputs skip them")
      .def("discards", [](const EventBatch& b) { return b.discards(); }, "{event index: reason} of the discarded events")
      .def("active", [](const EventBatch& b) {
        py::array_t<bool> out(static_cast<py::ssize_t>(b.size()));
        auto o = out.mutable_unchecked<1>();
        for (size_t i = 0; i < b.size(); ++i) o(i) = !b.skips(i);
        return out;
      }, "boolean mask of the events a module works on: neither rejected nor discarded")
      .def("errors", [](const EventBatch& b) { return b.errors(); })
      .def("select", [](const EventBatch& b, py::handle events) {
        // as given (checked_numbers): pybind11's cast read select([True, False]) as events 1 and 0
        carray<int64_t> idx;
        try {
          idx = checked_numbers<int64_t>(events, "events");
        } catch (const py::value_error& e) {  // a negative index: IndexError, as one past the batch
          throw py::index_error(std::string("select: ") + e.what());
        }
        return b.select(std::vector<size_t>(idx.data(), idx.data() + idx.shape(0)));
      }, py::arg("events"), "a new batch of these events (indices), in that order")
      .def_static("concat", &EventBatch::concat);

  m.attr("ERROR_REJECTED") = static_cast<uint32_t>(fw::kRejected);
  m.attr("ERROR_MODULE") = static_cast<uint32_t>(fw::kModuleError);
  m.attr("ERROR_DISCARDED") = static_cast<uint32_t>(fw::kDiscarded);
}
