#include <pybind11/stl.h>

#include <string>

#include "framework/heap.hpp"
#include "framework/processor.hpp"
#include "framework/registry.hpp"
#include "register.hpp"

using fw::Module;
using fw::ParamType;
using fw::ParamValue;

namespace {
// makes()/requires() of a module to Python: None (not said) or a tuple of collection names.
py::object names_or_none(const fw::Module::Collections& names) {
  if (!names) return py::none();
  py::tuple out(names->size());
  for (size_t i = 0; i < names->size(); ++i) out[i] = py::str((*names)[i]);
  return out;
}
}  // namespace

thread_local bool in_python_event = false;

bool is_bool(py::handle v) {
  if (py::isinstance<py::bool_>(v)) return true;
  const py::handle t = py::type::of(v);
  const std::string name = py::str(t.attr("__name__"));
  return (name == "bool_" || name == "bool") && std::string(py::str(t.attr("__module__"))) == "numpy";
}

namespace {

// eclreco._core.AbortJob: fw::AbortJob raised by Module.require_columns in Python, set by register_framework
py::object& abort_job_type() {
  static auto* cls = new py::object();  // never destroyed: no decref after the interpreter has finalized
  return *cls;
}

// A Python exception as a C++ one: the message without pybind11's traceback appendix.
// KeyboardInterrupt and SystemExit stop the program in Python: they end the job (fw::AbortJob,
// which process() turns back into the same Python exception) instead of flagging events.
[[noreturn]] void rethrow_python(const py::error_already_set& e) {
  std::string msg = e.what();
  // a module's require_columns from Python (fw::AbortJob there): the job ends with its one message
  if (e.matches(abort_job_type().ptr())) throw fw::AbortJob(py::str(e.value()), nullptr);
  if (e.matches(PyExc_KeyboardInterrupt) || e.matches(PyExc_SystemExit)) {
    const auto nl = msg.find('\n');
    throw fw::AbortJob("job ended by " + msg.substr(0, nl), std::make_exception_ptr(e));
  }
  // One line per event that still says where: the line that raised and, when that is in a
  // function it called, the line of the module's own method (the traceback's first entry is
  // the method called from C++); pybind11's "At:" text walks the whole stack instead.
  const auto at = msg.find("\n\nAt:");
  if (at != std::string::npos) msg = msg.substr(0, at);
  std::string where;
  py::object tb = e.trace();
  if (tb && !tb.is_none()) {
    auto frame = [](const py::handle& t) {
      const py::object code = t.attr("tb_frame").attr("f_code");
      return py::str(code.attr("co_filename")).cast<std::string>() + ":" +
             std::to_string(t.attr("tb_lineno").cast<long>()) + " in " + py::str(code.attr("co_name")).cast<std::string>();
    };
    py::object last = tb;
    while (!last.attr("tb_next").is_none()) last = last.attr("tb_next");
    where = " (at " + frame(last) + (last.is(tb) ? "" : ", called from " + frame(tb)) + ")";
  }
  // an exception raised without a message: its type says what happened (pybind11 writes a placeholder)
  const auto empty = msg.find("<EMPTY MESSAGE>");
  if (empty != std::string::npos) msg = msg.substr(0, empty) + "(no message)";
  // numpy's "assignment destination is read-only" / "output array is read-only" on a batch view
  // does not say that the fix is to assign a new array (the views share the batch's snapshot)
  if (e.matches(PyExc_ValueError) && msg.find("read-only") != std::string::npos)
    msg += " [batch columns are read-only views: write a column by assigning a new array, "
           "e.g. clusters[\"energy\"] = clusters[\"energy\"] * k]";
  throw std::runtime_error(msg + where);
}

// The GIL for a call from a framework thread into Python. For a thread without a Python thread
// state, pybind11 creates one when it takes the GIL and deletes it when it lets go: each batch
// then paid for a new thread state, and the first numpy call under it ran ~35 us slower
// (measured in ECLEnergyCorrection). The state is created once per thread instead and deleted
// when the thread ends (the processor joins its threads inside process(), so Python is alive).
class PythonCall {
 public:
  PythonCall() : fresh_(!kept_.kept && PyGILState_GetThisThreadState() == nullptr) {
    // fresh_ is decided before gil_ is constructed (member order)
    if (fresh_) {
      gil_.inc_ref();  // one reference more than this scope: the state outlives it
      kept_.kept = true;
    }
  }

 private:
  struct Kept {
    bool kept = false;
    ~Kept() {
      if (!kept || !Py_IsInitialized() || finalizing()) return;
      py::gil_scoped_acquire gil;
      gil.dec_ref();  // the reference of the constructor; ~gil drops the last and deletes the state
    }
    static bool finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
      return Py_IsFinalizing();
#else
      return _Py_IsFinalizing();
#endif
    }
  };
  static thread_local Kept kept_;
  bool fresh_;
  py::gil_scoped_acquire gil_;
};
thread_local PythonCall::Kept PythonCall::kept_;

// Python modules derive from this. Every call into Python takes the GIL for its own duration
// only (PythonCall), and a Python exception becomes a C++ one while the GIL is still held.
class PyModule : public Module {
 public:
  void initialize() override { call("initialize"); }
  void begin_run(uint64_t exp, uint64_t run) override { call("begin_run", exp, run); }
  void event(fw::EventBatch& batch) override {
    PythonCall gil;
    struct InEvent {
      InEvent() { in_python_event = true; }
      ~InEvent() { in_python_event = false; }
    } in_event;
    try {
      py::function f = py::get_override(static_cast<const Module*>(this), "event");
      if (f) lend_batch(batch, [&](py::handle b) { f(b); });
    } catch (py::error_already_set& e) {
      rethrow_python(e);
    }
  }
  void end_run(uint64_t exp, uint64_t run) override { call("end_run", exp, run); }
  void terminate() override { call("terminate"); }
  bool is_source() const override { return flag("is_source", false); }
  bool drains_at_stop() const override { return flag("drains_at_stop", false); }
  bool ordered() const override { return flag("ordered", false); }
  bool writes_events() const override { return flag("writes_events", false); }
  bool needs_gil() const override { return true; }
  Collections makes() const override { return collections("makes"); }
  Collections needs() const override { return collections("requires"); }
  bool next_batch(fw::EventBatch& batch, size_t max_events) override {
    PythonCall gil;
    try {
      py::function f = py::get_override(static_cast<const Module*>(this), "next_batch");
      if (!f) return false;
      bool more = false;
      lend_batch(batch, [&](py::handle b) {
        py::object r = f(b, max_events);
        // None (a forgotten return) would read as False: the end of the input, without a word
        if (!is_bool(r))
          throw py::type_error(type() + ".next_batch must return True (more batches follow) or False (this was the "
                               "last), not " + std::string(py::str(py::type::of(r).attr("__name__"))));
        more = r.cast<bool>();
      });
      return more;
    } catch (py::error_already_set& e) {
      rethrow_python(e);
    }
  }
  std::map<std::string, double> counters() const override {
    PythonCall gil;
    try {
      py::function f = py::get_override(static_cast<const Module*>(this), "counters");
      if (!f) return {};
      return f().cast<std::map<std::string, double>>();
    } catch (py::error_already_set& e) {
      rethrow_python(e);
    }
  }

 private:
  // The batch is moved into a Python-owned object for the call and moved back afterwards (no
  // copy). A module that keeps a reference beyond the call (a list of batches, say) keeps a
  // copy-on-write copy instead of a pointer into the processor's batch that would dangle. The
  // batch comes back on the error path too, so the processor can still flag its events.
  template <class F>
  static void lend_batch(fw::EventBatch& batch, F&& f) {
    py::object obj = py::cast(new fw::EventBatch(std::move(batch)), py::return_value_policy::take_ownership);
    auto give_back = [&] {
      auto& b = obj.cast<fw::EventBatch&>();
      if (obj.ref_count() == 1)
        batch = std::move(b);
      else
        batch = b;  // kept by Python: share the column buffers (copy-on-write)
    };
    try {
      f(obj);
    } catch (...) {
      give_back();
      throw;
    }
    give_back();
  }

  // Arguments are C++ values; they become Python objects only here, under the GIL.
  template <class... Args>
  void call(const char* name, Args... args) {
    PythonCall gil;
    try {
      py::function f = py::get_override(static_cast<const Module*>(this), name);
      if (f) f(py::cast(args, py::return_value_policy::reference)...);
    } catch (py::error_already_set& e) {
      rethrow_python(e);
    }
  }
  // makes() / requires(): None (not said) or collection names; a str (a tuple without its comma) is
  // refused, not read letter by letter.
  Collections collections(const char* name) const {
    PythonCall gil;
    try {
      py::function f = py::get_override(static_cast<const Module*>(this), name);
      if (!f) return std::nullopt;
      py::object r = f();
      if (r.is_none()) return std::nullopt;
      auto fail = [&] {
        throw py::type_error(type() + "." + name + "() must return None (not said) or collection names, e.g. "
                             "('ECLClusters',), not " + std::string(py::repr(r)));
      };
      if (py::isinstance<py::str>(r) || py::isinstance<py::bytes>(r) || !py::isinstance<py::iterable>(r)) fail();
      Names out;
      for (py::handle x : r) {
        if (!py::isinstance<py::str>(x)) fail();
        out.push_back(x.cast<std::string>());
      }
      return out;
    } catch (py::error_already_set& e) {
      rethrow_python(e);
    }
  }
  // is_source() / ordered() / ...: a bool (checked_bool), as next_batch's; the bool cast read None (a
  // forgotten return) as False and 0 / 1 or a str by their truth, which changed the path without a word.
  bool flag(const char* name, bool fallback) const {
    PythonCall gil;
    py::function f = py::get_override(static_cast<const Module*>(this), name);
    return f ? checked_bool(f(), (type() + "." + name + "()").c_str()) : fallback;
  }
};

// numbers.Integral / numbers.Real: Python's and numpy's scalars alike (np.int64(5) is an int
// parameter); bools (is_bool) are neither.
bool is_int(py::handle v) {
  static const py::object integral = py::module_::import("numbers").attr("Integral");
  return !is_bool(v) && (py::isinstance<py::int_>(v) || py::isinstance(v, integral));
}
bool is_number(py::handle v) {
  static const py::object real = py::module_::import("numbers").attr("Real");
  return is_int(v) || (!is_bool(v) && (py::isinstance<py::float_>(v) || py::isinstance(v, real)));
}
int64_t to_int64(py::handle v) {
  py::object i = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!i) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow) throw py::value_error(std::string(py::repr(v)) + " does not fit a 64-bit int");
  return x;
}
double to_double(py::handle v) { return py::float_(py::reinterpret_borrow<py::object>(v)).cast<double>(); }

// A list or tuple, or a 1-d numpy array (bin edges from np.linspace, cuts from np.array): its
// elements are numpy scalars, which the predicates take.
bool is_sequence_param(py::handle v) {
  if (py::isinstance<py::list>(v) || py::isinstance<py::tuple>(v)) return true;
  return py::isinstance<py::array>(v) && py::reinterpret_borrow<py::array>(v).ndim() == 1;
}

template <class T, class Pred>
std::optional<std::vector<T>> as_list(py::handle v, Pred ok) {
  if (!is_sequence_param(v)) return std::nullopt;
  std::vector<T> out;
  for (auto x : v) {
    if (!ok(x)) return std::nullopt;
    if constexpr (std::is_same_v<T, int64_t>)
      out.push_back(to_int64(x));
    else if constexpr (std::is_same_v<T, double>)
      out.push_back(to_double(x));
    else
      out.push_back(x.cast<T>());
  }
  return out;
}

// eclreco.ParameterTypeError: a value of the wrong type is a TypeError (as Python's own) and a ParameterError
// (what a steering file catches for every parameter mistake); set in register_framework.
py::object& parameter_type_error() {
  static auto* cls = new py::object();  // never destroyed: no decref after the interpreter has finalized
  return *cls;
}

// Python value -> the declared parameter type; a ParameterTypeError names the module and the parameter.
ParamValue to_param(const Module& m, const std::string& name, ParamType t, py::handle v) {
  auto fail = [&]() -> ParamValue {
    const std::string msg = m.type() + ": parameter '" + name + "' must be " + fw::param_type_name(t) + ", got " +
                            std::string(py::str(py::type::of(v).attr("__name__"))) + " (" + std::string(py::repr(v)) +
                            ")";
    PyErr_SetString(parameter_type_error().ptr(), msg.c_str());
    throw py::error_already_set();
  };
  try {  // 2**70 for an int: the message says whose parameter
    switch (t) {
      case ParamType::Bool: return is_bool(v) ? ParamValue(PyObject_IsTrue(v.ptr()) == 1) : fail();
      case ParamType::Int: return is_int(v) ? ParamValue(to_int64(v)) : fail();
      case ParamType::Float: return is_number(v) ? ParamValue(to_double(v)) : fail();
      case ParamType::Str:
        if (py::isinstance<py::str>(v)) return ParamValue(v.cast<std::string>());
        if (py::hasattr(v, "__fspath__")) return ParamValue(py::str(v.attr("__fspath__")()).cast<std::string>());
        return fail();
      case ParamType::FloatList: {
        auto l = as_list<double>(v, is_number);
        return l ? ParamValue(*l) : fail();
      }
      case ParamType::IntList: {
        auto l = as_list<int64_t>(v, is_int);
        return l ? ParamValue(*l) : fail();
      }
      case ParamType::StrList: {
        auto l = as_list<std::string>(v, [](py::handle x) { return py::isinstance<py::str>(x); });
        return l ? ParamValue(*l) : fail();
      }
    }
  } catch (const py::value_error& e) {
    throw fw::ParameterError(m.type() + ": parameter '" + name + "': " + e.what());
  }
  return fail();
}

ParamValue to_param(const Module& m, const std::string& name, py::handle v) {
  return to_param(m, name, m.params().get(name).type, v);
}

// add_param's type=: a ValueError naming the module, the parameter and the types there are.
ParamType type_from_name(const Module& m, const std::string& name, const std::string& s) {
  std::string known;
  for (ParamType t : {ParamType::Bool, ParamType::Int, ParamType::Float, ParamType::Str,
                      ParamType::FloatList, ParamType::IntList, ParamType::StrList}) {
    if (s == fw::param_type_name(t)) return t;
    known += std::string(known.empty() ? "" : ", ") + fw::param_type_name(t);
  }
  throw py::value_error(m.type() + ": parameter '" + name + "' has an unknown type '" + s + "' (types: " + known + ")");
}

py::list state_modules(const fw::ProcessState& s) {
  py::list out;
  for (const auto& m : s.modules) {
    py::dict d;
    d["name"] = m->name;
    d["calls"] = m->calls.load();
    d["events"] = m->events.load();
    d["seconds"] = m->nanoseconds.load() * 1e-9;
    d["cpu_seconds"] = m->cpu_nanoseconds.load() * 1e-9;
    d["errors"] = m->errors.load();
    py::list hist;
    for (const auto& h : m->batch_seconds_hist) hist.append(h.load());
    d["batch_seconds_hist"] = hist;
    out.append(d);
  }
  return out;
}

// process()'s options from Python (Processor.process, check_process_options), the integers through checked_integer
// (pybind11's cast read threads=True as 1 thread and refused 2**40 with its "incompatible function arguments"), the
// flag through checked_bool (its cast read None and 0 as False). Then ProcessOptions::validate's bounds
// (std::invalid_argument: a ValueError). The one place process() checks them.
fw::ProcessOptions process_options(py::handle max_events, py::handle threads, py::handle batch_size,
                                   py::handle install_signal_handlers) {
  fw::ProcessOptions o;
  o.install_signal_handlers = checked_bool(install_signal_handlers, "install_signal_handlers");
  const int64_t n = checked_integer<int64_t>(max_events, "max_events");
  if (n < 0) throw py::value_error("max_events must be >= 0 (0: every event), not " + std::to_string(n));
  o.max_events = static_cast<uint64_t>(n);
  o.threads = checked_integer<int>(threads, "threads");
  o.batch_size = checked_integer<int64_t>(batch_size, "batch_size");
  o.validate();
  return o;
}

}  // namespace

void register_framework(py::module_& m) {
  // Two C++ modules registered one name: the registry kept the one linked first, and the other would
  // never run. Importing eclreco fails instead (an ImportError naming both files).
  for (const auto& conflict : fw::ModuleRegistry::instance().conflicts()) throw std::runtime_error(conflict);
  py::class_<Module, PyModule, std::shared_ptr<Module>>(m, "Module", "Base of all modules (C++ and Python)")
      .def(py::init<>())
      .def_property_readonly("type", &Module::type)
      .def_property_readonly("description", &Module::description)
      .def("_set_identity", &Module::set_identity)
      .def("initialize", &Module::initialize)
      // exp and run through checked_integer: pybind11's cast read begin_run(True, 1) as experiment 1
      .def("begin_run", [](Module& self, py::handle exp, py::handle run) {
        self.begin_run(checked_integer<uint64_t>(exp, "exp"), checked_integer<uint64_t>(run, "run"));
      }, py::arg("exp"), py::arg("run"))
      .def("event", &Module::event)
      .def("end_run", [](Module& self, py::handle exp, py::handle run) {
        self.end_run(checked_integer<uint64_t>(exp, "exp"), checked_integer<uint64_t>(run, "run"));
      }, py::arg("exp"), py::arg("run"))
      .def("terminate", &Module::terminate)
      .def("is_source", &Module::is_source)
      .def("drains_at_stop", &Module::drains_at_stop)
      .def("ordered", &Module::ordered)
      .def("writes_events", &Module::writes_events)
      .def("counters", &Module::counters)
      .def("provenance", &Module::provenance,
           "what the output file's metadata records of the module beside its parameters: {key: {field: value}}, "
           "e.g. ECLUnpacker's {'conditions': {'path': ..., 'sha256': ...}}; {} for most modules")
      // a tuple, as a Python module's makes()/requires() and the docs give them (stl.h made a C++ module's a list)
      .def("makes", [](const Module& self) { return names_or_none(self.makes()); },
           "the collections the module adds to its batches (a tuple); None: not said")
      .def("requires", [](const Module& self) { return names_or_none(self.needs()); },
           "the collections the module reads and cannot do without (a tuple); None: not said")
      .def("set_param", [](Module& self, const std::string& name, py::handle v) {
        self.params().set(name, to_param(self, name, v));
      })
      .def("get_param", [](const Module& self, const std::string& name) { return self.params().value(name); })
      .def("declare_param", [](Module& self, const std::string& name, const std::string& type,
                               py::object default_value, const std::string& description) {
        const ParamType t = type_from_name(self, name, type);
        std::optional<ParamValue> d;
        if (!default_value.is_none()) d = to_param(self, name, t, default_value);
        self.params().declare(name, t, std::move(d), description);  // checks the default as set_param checks a value
      }, py::arg("name"), py::arg("type"), py::arg("default"), py::arg("description"))
      .def("param_list", [](const Module& self) {
        py::list out;
        for (const auto& p : self.params().list()) {
          py::dict d;
          d["name"] = p.name;
          d["type"] = fw::param_type_name(p.type);
          d["required"] = !p.default_value.has_value();
          d["default"] = p.default_value ? py::cast(*p.default_value) : py::none();
          d["default_repr"] = p.default_value ? fw::format_param_value(*p.default_value) : "(required)";
          d["value"] = (p.default_value || p.is_set) ? py::cast(p.value) : py::none();
          d["description"] = p.description;
          out.append(d);
        }
        return out;
      })
      .def("check_required", [](const Module& self) { self.params().check_required(); })
      .def("require_columns", [](const Module& self, const fw::Collection& c, const std::vector<std::string>& names) {
        try {
          fw::require_columns(self, c, names);
        } catch (const fw::AbortJob& a) {  // through Python to PyModule::event, which ends the job with it
          PyErr_SetString(abort_job_type().ptr(), a.what());
          throw py::error_already_set();
        }
      }, py::arg("collection"), py::arg("names"),
         "at the top of event(): a collection that lacks a column the module reads ends the job at its first "
         "batch (process() raises a RuntimeError), with one message naming the module, the collection and the columns");

  {  // fw::AbortJob on its way out of a Python module's event(); process() raises it as the C++ modules' (RuntimeError)
    PyObject* cls = PyErr_NewExceptionWithDoc("eclreco._core.AbortJob", "a module ended the job (Module.require_columns)",
                                              PyExc_RuntimeError, nullptr);
    if (!cls) throw py::error_already_set();
    abort_job_type() = py::reinterpret_steal<py::object>(cls);
    m.attr("AbortJob") = abort_job_type();
  }

  py::register_exception<fw::ParameterError>(m, "ParameterError", PyExc_ValueError);
  {
    const py::tuple bases = py::make_tuple(m.attr("ParameterError"), py::handle(PyExc_TypeError));
    PyObject* cls = PyErr_NewExceptionWithDoc("eclreco._core.ParameterTypeError",
                                              "a parameter value of the wrong type: a ParameterError and a TypeError",
                                              bases.ptr(), nullptr);
    if (!cls) throw py::error_already_set();
    parameter_type_error() = py::reinterpret_steal<py::object>(cls);
    m.attr("ParameterTypeError") = parameter_type_error();
  }

  m.def("cpp_modules", [] {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto* info : fw::ModuleRegistry::instance().list()) out.emplace_back(info->name, info->description);
    return out;
  }, "(name, description) of every registered C++ module");
  m.def("create_cpp_module", [](const std::string& name) { return fw::ModuleRegistry::instance().create(name); });

  py::class_<fw::Path>(m, "Path")
      .def(py::init<>())
      .def("add", &fw::Path::add)
      .def("modules", &fw::Path::modules);

  py::class_<fw::ProcessState, std::shared_ptr<fw::ProcessState>>(m, "ProcessState",
                                                                  "Live counters of a run (thread-safe reads)")
      .def_property_readonly("received", [](const fw::ProcessState& s) { return s.received.load(); })
      .def_property_readonly("processed", [](const fw::ProcessState& s) { return s.processed.load(); })
      .def_property_readonly("rejected", [](const fw::ProcessState& s) { return s.rejected.load(); })
      .def_property_readonly("discarded", [](const fw::ProcessState& s) { return s.discarded.load(); })
      .def_property_readonly("errors", [](const fw::ProcessState& s) { return s.errors.load(); })
      .def_property_readonly("batches", [](const fw::ProcessState& s) { return s.batches.load(); })
      .def_property_readonly("batches_in_flight", [](const fw::ProcessState& s) { return s.batches_in_flight.load(); })
      .def_property_readonly("running", [](const fw::ProcessState& s) { return s.running.load(); })
      .def_property_readonly("wall_seconds", [](const fw::ProcessState& s) { return s.wall_seconds.load(); })
      .def_property_readonly("loop_seconds", [](const fw::ProcessState& s) { return s.loop_seconds.load(); })
      .def_property_readonly("start_time", [](const fw::ProcessState& s) { return s.start_time.load(); })
      .def("rejected_by_reason", &fw::ProcessState::rejected_by_reason)
      .def("discarded_by_reason", &fw::ProcessState::discarded_by_reason)
      .def("error_messages", &fw::ProcessState::error_messages)
      .def_property_readonly("fatal_error", &fw::ProcessState::fatal_error,
                             "the error that ended the run (\"\" when none), known before the terminate calls")
      .def("modules", &state_modules)
      .def("events_per_batch_hist", [](const fw::ProcessState& s) {
        std::vector<uint64_t> out;
        for (const auto& h : s.events_per_batch_hist) out.push_back(h.load());
        return out;
      });
  m.attr("BATCH_SECONDS_BUCKETS") = std::vector<double>(fw::kBatchSecondsBuckets.begin(), fw::kBatchSecondsBuckets.end());

  m.def("check_process_options", [](py::handle threads, py::handle batch_size, py::handle max_events,
                                    py::handle install_signal_handlers) {
    process_options(max_events, threads, batch_size, install_signal_handlers);
  }, py::arg("threads"), py::arg("batch_size"), py::arg("max_events") = 0, py::arg("install_signal_handlers") = true,
     "TypeError / ValueError when process() would refuse these options (before the statistics are replaced)");
  // the bounds of process(threads=, batch_size=), for the command lines' checks before any work starts
  m.attr("MAX_THREADS") = fw::ProcessOptions::kMaxThreads;
  m.attr("MAX_BATCH_SIZE") = fw::ProcessOptions::kMaxBatchSize;

  py::class_<fw::Processor>(m, "Processor")
      .def(py::init<>())
      .def("process", [](fw::Processor& p, fw::Path& path, py::handle max_events, py::handle threads,
                         py::handle batch_size, py::handle install_signal_handlers) {
        const fw::ProcessOptions o = process_options(max_events, threads, batch_size, install_signal_handlers);
        py::gil_scoped_release release;  // the loop runs in C++; Python modules take the GIL themselves
        p.process(path, o);
      }, py::arg("path"), py::arg("max_events") = 0, py::arg("threads") = 1, py::arg("batch_size") = 256,
         py::arg("install_signal_handlers") = true)
      .def_property_readonly("state", &fw::Processor::state)
      .def("statistics_table", &fw::Processor::statistics_table);

  m.def("retain_freed_memory", [](py::handle trim, py::handle mmap) {  // True is no threshold of 1 byte
        return fw::retain_freed_memory(checked_integer<uint64_t>(trim, "trim_threshold"),
                                       checked_integer<uint64_t>(mmap, "mmap_threshold"));
      }, py::arg("trim_threshold") = fw::kRetainedHeapBytes,
        py::arg("mmap_threshold") = fw::kHeapMmapThresholdBytes,
        "keep freed heap for reuse instead of returning it to the kernel (glibc; process() does this); "
        "False where the C library cannot or refuses the values");
  m.def("request_stop", [](py::handle output_failed) { fw::request_stop(checked_bool(output_failed, "output_failed")); },
        py::arg("output_failed") = false,
        "end the running process() after the batches in flight; output_failed: an output can keep no more "
        "events, and a source that reads on after a stop (ZMQInput's drain) reads nothing more");
  m.def("output_failed", &fw::output_failed, "whether an output asked for the stop of the running process()");
  m.def("stop_requested", &fw::stop_requested);
  m.def("stop_signal", &fw::stop_signal,
        "the signal (SIGINT, SIGTERM) that stopped the last process() with its signal handlers; 0 if none");
}
