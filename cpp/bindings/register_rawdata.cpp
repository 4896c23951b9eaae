// Raw data wire format: batch formation for Python sources, and direct access to the envelope
// decoder and the payload unpacker (tests, fuzzing).
#include <pybind11/stl.h>

#include <chrono>
#include <cstring>
#include <stdexcept>

#include "ecl/envelope.hpp"
#include "ecl/geometry.hpp"
#include "ecl/unpacker.hpp"
#include "raw_envelopes.hpp"
#include "register.hpp"

namespace {

// Releases a buffer exported by PyObject_GetBuffer when it goes out of scope.
struct BufferRelease {
  Py_buffer* view;
  ~BufferRelease() { PyBuffer_Release(view); }
};

// Bytes of a Python object: bytes (zero copy, kept alive by `keep`) or a 1-d buffer of bytes
// (bytearray, memoryview, uint8 array), copied into `copy` in its logical order: a strided or
// reversed view (memoryview(a)[::2], a[::-1]) is not one run of memory from its pointer, and
// reading size bytes from there decoded other bytes or read past the end of its memory.
rawdata::MessageRef message_of(py::handle obj, std::vector<py::object>& keep, std::string& copy) {
  if (PyBytes_Check(obj.ptr())) {
    keep.push_back(py::reinterpret_borrow<py::object>(obj));
    return {reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(obj.ptr())),
            static_cast<size_t>(PyBytes_GET_SIZE(obj.ptr()))};
  }
  const std::string type = py::str(py::type::of(obj).attr("__name__"));
  if (!PyObject_CheckBuffer(obj.ptr())) throw py::type_error("a raw message must be bytes (or a buffer of bytes), got " + type);
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_FULL_RO) != 0) throw py::error_already_set();
  BufferRelease release{&view};
  if (view.itemsize != 1 || view.ndim > 1)
    throw py::type_error("a raw message must be bytes or a 1-d buffer of bytes, got a " + type + " of " +
                         std::to_string(view.ndim) + " dimension(s) and " + std::to_string(view.itemsize) +
                         "-byte items (pass bytes(...) or a uint8 view)");
  copy.resize(static_cast<size_t>(view.len));
  if (view.len && PyBuffer_ToContiguous(copy.data(), &view, view.len, 'C') != 0) throw py::error_already_set();
  return {reinterpret_cast<const uint8_t*>(copy.data()), copy.size()};
}

// A message that breaks the wire format, raised as _core.RawDataRejection (a ValueError) 'reason: detail': told
// apart from an argument's ValueError, which rawdata.py's wrappers made a RawDataError whose reason was its text.
struct RawDataRejection : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void raise(const char* reason, const std::string& detail) {
  throw RawDataRejection(std::string(reason) + ": " + detail);
}

// None: the default; else n_cells numbers (checked_reals: a forcecast read strings and dropped complex parts).
std::vector<double> optional_per_cell(const py::object& a, const char* name, int n_cells) {
  if (a.is_none()) return {};
  const auto arr = checked_reals<double>(a, name, n_cells, "one per cellId");
  return std::vector<double>(arr.data(), arr.data() + arr.shape(0));
}

// None: the spec's linear map; else an (n_cells, 3) integer array of (collector, shaper, channel). Each column
// as given (checked_numbers): a forcecast to int64 read a float 3.7 as channel 3 and wrapped a uint64 past
// 2**63 - 1 to a negative one; ChannelMap::from checks the addresses.
ecl::ChannelMap optional_channel_map(const py::object& a, int n_cells) {
  if (a.is_none()) return {};
  const auto arr = py::array::ensure(a);
  if (!arr || arr.ndim() != 2 || arr.shape(1) != 3)
    throw py::value_error("channel_map must be an (n_cells, 3) array of (collector, shaper, channel)");
  static const char* const column_name[3] = {"channel_map collector", "channel_map shaper", "channel_map channel"};
  std::vector<std::array<int, 3>> addr(static_cast<size_t>(arr.shape(0)));
  for (int j = 0; j < 3; ++j) {
    const auto column = checked_numbers<int32_t>(arr.attr("T")[py::int_(j)], column_name[j]);
    for (size_t k = 0; k < addr.size(); ++k) addr[k][j] = column.data()[k];
  }
  return ecl::ChannelMap::from(n_cells, addr);
}

}  // namespace

void register_rawdata(py::module_& m) {
  py::register_exception<RawDataRejection>(m, "RawDataRejection", PyExc_ValueError);
  m.def(
      "append_envelopes",
      [](fw::EventBatch& batch, const py::sequence& messages) {
        const size_t n = py::len(messages);
        std::vector<py::object> keep;
        keep.reserve(n);
        std::vector<std::string> copies(n);
        std::vector<rawdata::MessageRef> refs(n);
        for (size_t k = 0; k < n; ++k) refs[k] = message_of(messages[k], keep, copies[k]);
        {
          py::gil_scoped_release release;  // `keep` holds references: the bytes stay alive
          rawdata::append_envelopes(batch, refs);
        }
      },
      py::arg("batch"), py::arg("messages"),
      "Append one event per raw message (bytes) to the batch: RawEnvelopes, RawPayloadRef, metadata; "
      "malformed envelopes are rejected with their reason. Decodes without the GIL.");

  m.def(
      "append_envelope_blocks",
      [](fw::EventBatch& batch, const py::sequence& blocks) {
        std::vector<py::object> keep;
        std::vector<rawdata::MessageRef> refs;
        for (size_t b = 0; b < py::len(blocks); ++b) {
          const py::tuple t = py::reinterpret_borrow<py::object>(blocks[b]).cast<py::tuple>();
          if (t.size() != 2 || !PyBytes_Check(t[0].ptr()))
            throw py::type_error("a block is (bytes, offsets)");
          keep.push_back(t[0]);
          const auto* data = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(t[0].ptr()));
          const auto size = static_cast<int64_t>(PyBytes_GET_SIZE(t[0].ptr()));
          // checked as given (>= 0, non-decreasing, integers): forcecast truncated a float offset
          const std::string name = "blocks[" + std::to_string(b) + "] offsets";
          const Offsets off = checked_offsets(t[1], name.c_str());
          const int64_t* o = off.data();
          const size_t n = off.n_events;
          if (o[n] > size)
            throw py::value_error(name + "[" + std::to_string(n) + "] = " + std::to_string(o[n]) +
                                  " is outside the block's " + std::to_string(size) + " bytes");
          for (size_t k = 0; k < n; ++k) refs.push_back({data + o[k], static_cast<size_t>(o[k + 1] - o[k])});
        }
        py::gil_scoped_release release;  // `keep` holds the blocks: their bytes stay alive
        rawdata::append_envelopes(batch, refs);
      },
      py::arg("batch"), py::arg("blocks"),
      "Like append_envelopes for raw messages stored back to back: each block is (bytes, offsets), "
      "message k being bytes[offsets[k]:offsets[k + 1]] (one ZeroMQ frame for many events).");

  m.def(
      "decode_envelope",
      [](const py::bytes& message) {
        std::string_view v = message;
        ecl::Envelope e;
        {
          py::gil_scoped_release release;
          e = ecl::decode_envelope(reinterpret_cast<const uint8_t*>(v.data()), v.size());
        }
        if (!e.ok()) raise(e.reason, e.detail);
        py::dict d;
        d["exp"] = e.exp;
        d["run"] = e.run;
        d["evt"] = e.evt;
        d["det"] = ecl::detector_name(static_cast<ecl::Detector>(e.detector));
        d["detector"] = e.detector;
        d["time_ns"] = e.has_time ? py::object(py::int_(e.time_ns)) : py::none();
        d["crc32"] = e.has_crc ? py::object(py::int_(e.crc32)) : py::none();
        d["payload_offset"] = e.payload_offset;
        d["payload_size"] = e.payload_size;
        d["run_offset"] = e.run_offset;
        d["run_size"] = e.run_size;
        d["evt_offset"] = e.evt_offset;
        d["evt_size"] = e.evt_size;
        d["ecl"] = py::bytes(v.data() + e.payload_offset, e.payload_size);
        return d;
      },
      py::arg("message"),
      "Decode one envelope: a dict (exp, run, evt, det, detector, time_ns, crc32, payload_offset, "
      "payload_size, run_offset, run_size, evt_offset, evt_size (the bytes of the run and evt ints), ecl); "
      "RawDataRejection (a ValueError) 'reason: detail' when it is malformed.");

  m.def(
      "envelope_numbers",
      [](const py::bytes& message) -> py::object {
        std::string_view v = message;
        const ecl::Envelope e = ecl::decode_envelope(reinterpret_cast<const uint8_t*>(v.data()), v.size());
        if (!e.ok()) return py::none();
        return py::make_tuple(e.run, e.evt, e.run_offset, e.run_size, e.evt_offset, e.evt_size);
      },
      py::arg("message"),
      "(run, evt, run_offset, run_size, evt_offset, evt_size) of a valid envelope (where the bytes of its run "
      "and evt ints lie), None for a message that is not one: decode_envelope without the dict and the "
      "payload's copy, for the DAQ emulator's looped replay, which renumbers every message of a pass.");

  m.def(
      "unpack_payload",
      [](const py::bytes& payload, py::object detector, py::object gain, py::object t0, py::object channel_map) {
        const ecl::Detector det = detector_arg(detector, "detector");
        const int n_cells = ecl::Geometry::get(det).n_cells;
        ecl::Calibration cal;
        ecl::ChannelMap map;
        try {
          cal = ecl::Calibration::from(n_cells, optional_per_cell(gain, "gain", n_cells),
                                       optional_per_cell(t0, "t0", n_cells));
          map = optional_channel_map(channel_map, n_cells);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
        std::string_view v = payload;
        const size_t cap = ecl::max_digits(v.size());
        py::array_t<int32_t> cell(cap), amplitude(cap);
        py::array_t<float> energy(cap), time(cap);
        py::array_t<uint8_t> quality(cap);
        ecl::DigitOut out{cell.mutable_data(), energy.mutable_data(), time.mutable_data(), quality.mutable_data(),
                          amplitude.mutable_data()};
        ecl::UnpackResult r;
        {
          py::gil_scoped_release release;
          r = ecl::unpack_payload(reinterpret_cast<const uint8_t*>(v.data()), v.size(), cal, map, out);
        }
        if (!r.ok()) raise(r.reason, r.detail);
        const py::ssize_t n = static_cast<py::ssize_t>(r.n_digits);
        py::dict d;
        d["cell"] = cell[py::slice(0, n, 1)];
        d["energy"] = energy[py::slice(0, n, 1)];
        d["time"] = time[py::slice(0, n, 1)];
        d["quality"] = quality[py::slice(0, n, 1)];
        d["amplitude"] = amplitude[py::slice(0, n, 1)];
        return d;
      },
      py::arg("payload"), py::arg("detector") = "belle2-ecl", py::arg("gain") = py::none(),
      py::arg("t0") = py::none(), py::arg("channel_map") = py::none(),
      "Unpack one ECL payload: dict of numpy arrays (cell, energy, time, quality, amplitude) sorted by "
      "cellId; RawDataRejection (a ValueError) 'reason: detail' when it breaks a rule of the format (an argument "
      "error is a ValueError / TypeError naming the argument). gain, t0: per cellId - 1 "
      "(default 1, 0); channel_map: (n_cells, 3) addresses (collector, shaper, channel) (default the linear map).");

  m.def(
      "frame_stream",
      [](py::handle data) {
        Py_buffer view;  // contiguous bytes (bytes, bytearray, mmap, ...), BufferError otherwise
        if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw py::error_already_set();
        BufferRelease release{&view};
        const auto size = static_cast<size_t>(view.len);
        std::vector<int64_t> offsets{0};
        ecl::Envelope e;
        size_t pos;
        {
          py::gil_scoped_release nogil;  // the exported buffer stays valid until `release`
          pos = ecl::frame_stream(static_cast<const uint8_t*>(view.buf), size, offsets, e);
        }
        py::array_t<int64_t> off(static_cast<py::ssize_t>(offsets.size()));
        std::memcpy(off.mutable_data(), offsets.data(), offsets.size() * sizeof(int64_t));
        py::object error = py::none();
        if (pos < size) error = py::make_tuple(pos, e.reason, e.detail);
        return py::make_tuple(off, error);
      },
      py::arg("data"),
      "Frame a MessagePack stream (a raw file) as RawFileInput does (decode_envelope_prefix): (offsets "
      "int64 [n + 1], error), message k being data[offsets[k]:offsets[k + 1]]; error is None when every "
      "byte was framed, else (byte offset, reason, detail) of the first bytes that cannot be (not_msgpack, "
      "truncated), where framing stopped. Invalid envelopes that are whole MessagePack objects are framed.");

  m.attr("MULTI_FRAME_TAG") = py::bytes(ecl::kMultiFrameTag, ecl::kMultiFrameTagSize);
  m.attr("OVERSIZE_TAG") = py::bytes(ecl::kOversizeTag, ecl::kOversizeTagSize);
  m.attr("VERBATIM_TAG") = py::bytes(ecl::kVerbatimTag, ecl::kVerbatimTagSize);

  m.def(
      "crc32",
      [](const py::bytes& data, py::handle crc_in) {
        const uint32_t crc = checked_integer<uint32_t>(crc_in, "crc");  // True is no running CRC of 1
        std::string_view v = data;
        return ecl::crc32(reinterpret_cast<const uint8_t*>(v.data()), v.size(), crc);
      },
      py::arg("data"), py::arg("crc") = 0, "zlib CRC-32 (the one the envelope's crc32 key holds)");

  m.def(
      "_bench_rawdata",
      [](const py::sequence& messages, py::handle repeats_in) {
        const int repeats = checked_integer<int>(repeats_in, "repeats");
        // at least one pass: the results are per pass, the batch time the smallest of them (none: a crash)
        if (repeats < 1) throw py::value_error("repeats must be >= 1, not " + std::to_string(repeats));
        const size_t n = py::len(messages);
        std::vector<py::object> keep;
        std::vector<std::string> copies(n);
        std::vector<rawdata::MessageRef> refs(n);
        for (size_t k = 0; k < n; ++k) refs[k] = message_of(messages[k], keep, copies[k]);
        py::gil_scoped_release release;
        using clock = std::chrono::steady_clock;
        std::vector<ecl::Envelope> env(n);
        size_t max_payload = 0;
        const auto t0 = clock::now();
        for (int r = 0; r < repeats; ++r)
          for (size_t k = 0; k < n; ++k) env[k] = ecl::decode_envelope(refs[k].data, refs[k].size);
        const auto t1 = clock::now();
        for (const auto& e : env) max_payload = std::max(max_payload, e.payload_size);
        const ecl::Calibration cal[2] = {ecl::Calibration::defaults(8736), ecl::Calibration::defaults(900)};
        const size_t cap = ecl::max_digits(max_payload);
        std::vector<int32_t> cell(cap), amp(cap);
        std::vector<float> energy(cap), time(cap);
        std::vector<uint8_t> quality(cap);
        std::vector<uint64_t> scratch;
        ecl::DigitOut out{cell.data(), energy.data(), time.data(), quality.data(), amp.data()};
        size_t digits = 0;
        const auto t2 = clock::now();
        for (int r = 0; r < repeats; ++r)
          for (size_t k = 0; k < n; ++k) {
            if (!env[k].ok()) continue;
            digits += ecl::unpack_payload(refs[k].data + env[k].payload_offset, env[k].payload_size,
                                          cal[env[k].detector], ecl::ChannelMap{}, out, &scratch)
                          .n_digits;
          }
        const auto t3 = clock::now();
        std::vector<double> batch_times;
        for (int r = 0; r < repeats; ++r) {
          fw::EventBatch b(0);
          const auto a = clock::now();
          rawdata::append_envelopes(b, refs);
          batch_times.push_back(std::chrono::duration<double>(clock::now() - a).count());
        }
        auto sec = [](clock::time_point a, clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
        std::map<std::string, double> res;
        res["envelope_s"] = sec(t0, t1) / repeats;
        res["unpack_s"] = sec(t2, t3) / repeats;
        res["append_envelopes_s"] = *std::min_element(batch_times.begin(), batch_times.end());
        res["digits"] = static_cast<double>(digits / repeats);
        res["events"] = static_cast<double>(n);
        return res;
      },
      py::arg("messages"), py::arg("repeats") = 5,
      "benchmark without the framework: seconds per pass of decode_envelope, unpack_payload and "
      "append_envelopes (one batch) over the messages, repeats (>= 1) passes");
}
