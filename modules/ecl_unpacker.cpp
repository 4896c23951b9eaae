// ECLUnpacker: decodes the ECL payload of every non-rejected event into the collection
// ECLDigits (cell int32, energy float32 GeV, time float32 ns, quality uint8, amplitude int32),
// sorted by cellId, with the channel map and calibration of spec/wire-format.md. An event whose
// payload breaks a rule of the format is rejected with its reason (ecl/unpacker.hpp) and gets no
// digits; the rest of the batch goes on.
//
// Also writes ECLEventInformation, one row per event: n_out_of_time_digits (int32), the digits with
// a valid time but |t| > 125 ns (ecl/digit_summary.hpp; 0 for a rejected event), the event's
// beam-background measure the belle2-ecl CNN reads. Counted here, while the event's digits are in
// the cache: a later pass over all digits of the batch costs more than the count and evicts the
// CNN's weights.
//
// Parameter `conditions`: path of a JSON file with conditions data that override the spec's
// defaults (wire-format "Channel map and calibration ... conditions data that a run may override"):
// one payload, or an array of payloads,
//   {"detector": "belle2-ecl" | "array30", "gain": [n_cells numbers], "t0": [n_cells numbers],
//    "channel_map": [n_cells [collector, shaper, channel]], "iov": [exp_low, run_low, exp_high, run_high]}
// "gain", "t0" and "channel_map" are indexed by cellId - 1 and optional (default 1.0, 0.0 and the
// linear map); "iov" is basf2's interval of validity (-1: open; default: all runs). Payloads of one
// detector must not overlap. Any other key, a wrong length, a non-finite number, an address used
// twice is an error at initialize. A detector without a payload keeps the defaults for every run;
// an event of a detector that has payloads, none of which covers its (exp, run), is rejected
// [no_conditions] and kept like any rejected event. provenance() gives the file's absolute path and the
// SHA-256 of the bytes parsed, for the output file's metadata.
#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "ecl/digit_summary.hpp"
#include "ecl/geometry.hpp"
#include "ecl/unpacker.hpp"
#include "framework/registry.hpp"
#include "framework/sha256.hpp"

namespace {

// A small strict JSON reader, enough for conditions files (objects, arrays, numbers, strings,
// true/false/null).
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  double number = 0;
  bool boolean = false;
  std::string str;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;
};

// Bytes of a file quoted in an error message: printable ASCII as is, anything else as \xNN (the
// message must stay valid UTF-8 for Python).
std::string printable(const std::string& b) {
  std::string out;
  for (unsigned char c : b) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  static constexpr int kMaxDepth = 64;  // a conditions file nests two levels; recursion is bounded
  Json parse() {
    Json v = value();
    ws();
    if (p_ != s_.size()) fail("unexpected trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("invalid JSON at character " + std::to_string(p_) + ": " + what);
  }
  void ws() {
    while (p_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[p_]))) ++p_;
  }
  bool lit(const char* w) {
    const size_t n = std::strlen(w);
    if (s_.compare(p_, n, w) == 0) {
      p_ += n;
      return true;
    }
    return false;
  }
  Json value() {
    ws();
    if (p_ >= s_.size()) fail("unexpected end");
    struct Depth {
      int& d;
      explicit Depth(int& x) : d(x) { ++d; }
      ~Depth() { --d; }
    } depth(depth_);
    if (depth_ > kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    Json v;
    const char c = s_[p_];
    if (c == '{') {
      v.kind = Json::Object;
      ++p_;
      ws();
      if (p_ < s_.size() && s_[p_] == '}') {
        ++p_;
        return v;
      }
      for (;;) {
        ws();
        if (p_ >= s_.size() || s_[p_] != '"') fail("expected a string key");
        const size_t key_at = p_;
        std::string k = string();
        for (const auto& m : v.members)
          if (m.first == k) {
            p_ = key_at;
            fail("key '" + printable(k) + "' appears twice");
          }
        ws();
        if (p_ >= s_.size() || s_[p_] != ':') fail("expected ':'");
        ++p_;
        v.members.emplace_back(std::move(k), value());
        ws();
        if (p_ < s_.size() && s_[p_] == ',') { ++p_; continue; }
        if (p_ < s_.size() && s_[p_] == '}') { ++p_; return v; }
        fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = Json::Array;
      ++p_;
      ws();
      if (p_ < s_.size() && s_[p_] == ']') {
        ++p_;
        return v;
      }
      for (;;) {
        v.items.push_back(value());
        ws();
        if (p_ < s_.size() && s_[p_] == ',') { ++p_; continue; }
        if (p_ < s_.size() && s_[p_] == ']') { ++p_; return v; }
        fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.kind = Json::String;
      v.str = string();
      return v;
    }
    if (lit("true")) { v.kind = Json::Bool; v.boolean = true; return v; }
    if (lit("false")) { v.kind = Json::Bool; return v; }
    if (lit("null")) return v;
    if (c == '-' || std::isdigit(static_cast<unsigned char>(c))) {
      // JSON's number grammar, -?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?, checked before strtod (which
      // would also take hex, inf and nan)
      const size_t start = p_;
      auto digits = [&] {
        const size_t d0 = p_;
        while (p_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[p_]))) ++p_;
        return p_ > d0;
      };
      if (s_[p_] == '-') ++p_;
      if (p_ < s_.size() && s_[p_] == '0') ++p_;
      else if (!digits()) fail("bad number");
      if (p_ < s_.size() && s_[p_] == '.') {
        ++p_;
        if (!digits()) fail("bad number");
      }
      if (p_ < s_.size() && (s_[p_] == 'e' || s_[p_] == 'E')) {
        ++p_;
        if (p_ < s_.size() && (s_[p_] == '+' || s_[p_] == '-')) ++p_;
        if (!digits()) fail("bad number");
      }
      v.kind = Json::Number;
      v.number = std::strtod(s_.substr(start, p_ - start).c_str(), nullptr);
      return v;
    }
    fail("unexpected character '" + printable(std::string(1, c)) + "'");
  }
  std::string string() {
    ++p_;  // opening quote
    std::string out;
    while (p_ < s_.size() && s_[p_] != '"') {
      if (s_[p_] == '\\') {
        ++p_;
        if (p_ >= s_.size()) break;
        const char e = s_[p_];
        out += e == 'n' ? '\n' : e == 't' ? '\t' : e;  // enough for keys and detector names
      } else {
        out += s_[p_];
      }
      ++p_;
    }
    if (p_ >= s_.size()) fail("unterminated string");
    ++p_;
    return out;
  }
  const std::string& s_;
  size_t p_ = 0;
  int depth_ = 0;
};

std::vector<double> number_array(const Json& v, const std::string& name, int n_cells, const std::string& where) {
  if (v.kind != Json::Array) throw std::runtime_error(where + "'" + name + "' must be an array of numbers");
  if (v.items.size() != static_cast<size_t>(n_cells))
    throw std::runtime_error(where + "'" + name + "' has " + std::to_string(v.items.size()) +
                             " entries, the detector has " + std::to_string(n_cells) + " cells");
  std::vector<double> out;
  out.reserve(v.items.size());
  for (size_t k = 0; k < v.items.size(); ++k) {
    if (v.items[k].kind != Json::Number || !std::isfinite(v.items[k].number))
      throw std::runtime_error(where + "'" + name + "'[" + std::to_string(k) + "] (cellId " + std::to_string(k + 1) +
                               ") is not a finite number");
    out.push_back(v.items[k].number);
  }
  return out;
}

// An integer-valued JSON number in lo..hi (JSON numbers are doubles: exact up to 2^53).
int64_t integer(const Json& v, int64_t lo, int64_t hi, const std::string& what) {
  if (v.kind != Json::Number || !(v.number >= static_cast<double>(lo) && v.number <= static_cast<double>(hi)) ||
      v.number != std::floor(v.number))
    throw std::runtime_error(what + " must be an integer in " + std::to_string(lo) + ".." + std::to_string(hi));
  return static_cast<int64_t>(v.number);
}

// One payload of conditions data: the calibration and channel map of one detector over an
// interval of validity, (exp, run) from lo to hi inclusive.
struct ConditionsPayload {
  uint64_t lo_exp = 0, lo_run = 0;
  uint64_t hi_exp = std::numeric_limits<uint64_t>::max(), hi_run = std::numeric_limits<uint64_t>::max();
  std::string iov = "all runs";  // as written, for messages
  ecl::Calibration calibration;
  ecl::ChannelMap channel_map;
  bool covers(uint64_t exp, uint64_t run) const {
    return std::pair(lo_exp, lo_run) <= std::pair(exp, run) && std::pair(exp, run) <= std::pair(hi_exp, hi_run);
  }
};

class ECLUnpacker : public fw::Module {
 public:
  ECLUnpacker() {
    params().add("conditions", &conditions_, std::string(),
                 "JSON file of conditions payloads, one or an array: {\"detector\": name, \"gain\": [...], \"t0\": [...], "
                 "\"channel_map\": [[collector, shaper, channel], ...], \"iov\": [exp_low, run_low, exp_high, run_high]}, "
                 "each key but detector optional, lists indexed by cellId - 1 (empty: gain 1, t0 0, the linear map, all runs)");
  }

  Collections makes() const override { return Names{"ECLDigits", "ECLEventInformation"}; }
  Collections needs() const override { return Names{"RawEnvelopes", "RawPayloadRef"}; }

  void initialize() override {
    for (ecl::Detector d : {ecl::Detector::Belle2ECL, ecl::Detector::Array30}) {
      payloads_[static_cast<int>(d)].assign(1, ConditionsPayload{});
      payloads_[static_cast<int>(d)][0].calibration = ecl::Calibration::defaults(ecl::Geometry::get(d).n_cells);
    }
    conditions_file_.clear();
    if (!conditions_.empty()) load_conditions(conditions_);
  }

  Provenance provenance() const override {
    if (conditions_file_.empty()) return {};  // the spec's defaults: the parameter '' says so
    return {{"conditions", conditions_file_}};
  }

  void event(fw::EventBatch& batch) override {
    if (!batch.has("RawEnvelopes") || !batch.has("RawPayloadRef"))
      throw std::runtime_error(
          "no RawEnvelopes/RawPayloadRef in the batch: put a raw data source first (RawFileInput, or a source "
          "calling _core.append_envelopes)");
    const size_t n = batch.size();
    const fw::Collection& raw = batch.get("RawEnvelopes");
    const fw::Collection& ref = batch.get("RawPayloadRef");
    const uint8_t* bytes = raw.column("bytes").data<uint8_t>();
    const int64_t* moff = raw.offsets();
    const int64_t* roff = ref.offsets();
    const int64_t* p_off = ref.column("offset").data<int64_t>();
    const int64_t* p_size = ref.column("size").data<int64_t>();
    const uint8_t* det = std::as_const(batch).detector();

    // The payload must lie in the event's message: a source that builds RawPayloadRef itself (not
    // with _core.append_envelopes) and gets it wrong made the unpacker read outside the buffer. Its
    // events fail (module errors, the processor re-runs the batch one event at a time); two compares
    // per event.
    size_t cap = 0;
    for (size_t i = 0; i < n; ++i) {
      if (batch.skips(i) || roff[i + 1] == roff[i]) continue;
      const int64_t r = roff[i], len = moff[i + 1] - moff[i];
      if (p_off[r] < 0 || p_size[r] < 0 || p_off[r] > len || p_size[r] > len - p_off[r])
        throw std::runtime_error("RawPayloadRef puts the payload at offset " + std::to_string(p_off[r]) + ", size " +
                                 std::to_string(p_size[r]) + " of a message of " + std::to_string(len) +
                                 " bytes (a source's own RawPayloadRef; _core.append_envelopes writes it)");
      cap += ecl::max_digits(static_cast<size_t>(p_size[r]));
    }

    fw::Column cell = fw::Column::of<int32_t>(cap), energy = fw::Column::of<float>(cap),
               time = fw::Column::of<float>(cap), quality = fw::Column::of<uint8_t>(cap),
               amplitude = fw::Column::of<int32_t>(cap);
    ecl::DigitOut out{cell.data<int32_t>(), energy.data<float>(), time.data<float>(), quality.data<uint8_t>(),
                      amplitude.data<int32_t>()};
    std::vector<int64_t> counts(n, 0);
    fw::Column oot = fw::Column::of<int32_t>(n);  // zeros: a rejected or empty event counts 0
    int32_t* n_oot = oot.data<int32_t>();
    std::vector<uint64_t> scratch;
    size_t pos = 0;
    uint64_t rejected = 0;
    const uint64_t* exps = std::as_const(batch).exp();
    const uint64_t* runs = batch.run();
    // The payload of the last (exp, run) looked up, per detector (a batch holds one run, as a rule).
    const ConditionsPayload* cond[2] = {nullptr, nullptr};
    bool looked_up[2] = {false, false};
    uint64_t cond_exp[2] = {0, 0}, cond_run[2] = {0, 0};
    for (size_t i = 0; i < n; ++i) {
      if (batch.skips(i) || roff[i + 1] == roff[i]) continue;
      const int64_t r = roff[i];
      const uint8_t d = det[i] <= 1 ? det[i] : 0;
      if (!looked_up[d] || cond_exp[d] != exps[i] || cond_run[d] != runs[i]) {
        cond[d] = find_payload(d, exps[i], runs[i]);
        looked_up[d] = true, cond_exp[d] = exps[i], cond_run[d] = runs[i];
      }
      if (!cond[d]) {
        batch.reject(i, "no_conditions", no_conditions_detail(d, exps[i], runs[i]));
        ++rejected;
        continue;
      }
      ecl::DigitOut o{out.cell + pos, out.energy + pos, out.time + pos, out.quality + pos, out.amplitude + pos};
      ecl::UnpackResult res = ecl::unpack_payload(bytes + moff[i] + p_off[r], static_cast<size_t>(p_size[r]),
                                                  cond[d]->calibration, cond[d]->channel_map, o, &scratch);
      if (!res.ok()) {
        batch.reject(i, res.reason, res.detail);
        ++rejected;
        continue;
      }
      counts[i] = static_cast<int64_t>(res.n_digits);
      n_oot[i] = ecl::count_out_of_time(o.time, o.quality, res.n_digits);
      pos += res.n_digits;
    }
    for (fw::Column* c : {&cell, &energy, &time, &quality, &amplitude}) c->resize(pos);
    fw::Collection& digits = batch.add("ECLDigits");
    digits.set_counts(counts);
    digits.set_column("cell", std::move(cell));
    digits.set_column("energy", std::move(energy));
    digits.set_column("time", std::move(time));
    digits.set_column("quality", std::move(quality));
    digits.set_column("amplitude", std::move(amplitude));
    fw::Collection& info = batch.add("ECLEventInformation");
    info.set_counts(std::vector<int64_t>(n, 1));
    info.set_column("n_out_of_time_digits", std::move(oot));
    digits_.fetch_add(pos, std::memory_order_relaxed);
    rejected_.fetch_add(rejected, std::memory_order_relaxed);
  }

  std::map<std::string, double> counters() const override {
    return {{"digits", static_cast<double>(digits_.load())}, {"rejected", static_cast<double>(rejected_.load())}};
  }

 private:
  const ConditionsPayload* find_payload(int d, uint64_t exp, uint64_t run) const {
    for (const ConditionsPayload& p : payloads_[d])
      if (p.covers(exp, run)) return &p;
    return nullptr;
  }

  std::string no_conditions_detail(int d, uint64_t exp, uint64_t run) const {
    std::string s = "no payload of conditions file '" + conditions_ + "' for " +
                    ecl::detector_name(static_cast<ecl::Detector>(d)) + " covers exp " + std::to_string(exp) +
                    " run " + std::to_string(run) + " (its intervals of validity:";
    for (size_t k = 0; k < payloads_[d].size() && k < 4; ++k) s += " " + payloads_[d][k].iov;
    if (payloads_[d].size() > 4) s += " ... " + std::to_string(payloads_[d].size()) + " in all";
    return s + ")";
  }

  void load_conditions(const std::string& path) {
    std::error_code ec;
    if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec))
      throw std::runtime_error("conditions file '" + path + "' is not a regular file");
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open conditions file '" + path + "'");
    std::stringstream ss;
    ss << f.rdbuf();
    const std::string text = ss.str();
    // the digest of these bytes, not of a second read: the file may change while the job runs
    auto file = fw::file_provenance(path, fw::sha256_hex(text));
    Json doc;
    try {
      doc = JsonParser(text).parse();
    } catch (const std::exception& e) {
      throw std::runtime_error("conditions file '" + path + "': " + e.what());
    }
    std::vector<const Json*> items;
    if (doc.kind == Json::Object) {
      items.push_back(&doc);
    } else if (doc.kind == Json::Array) {
      for (const Json& v : doc.items) items.push_back(&v);
      if (items.empty()) throw std::runtime_error(path + ": an empty array of payloads");
    } else {
      throw std::runtime_error(path + ": a conditions file is a JSON object (one payload) or an array of payloads");
    }
    std::vector<ConditionsPayload> loaded[2];
    for (size_t n = 0; n < items.size(); ++n) {
      const std::string where = doc.kind == Json::Object ? path + ": " : path + ": payload " + std::to_string(n) + ": ";
      load_payload(*items[n], where, loaded);
    }
    for (int d = 0; d < 2; ++d) {
      if (loaded[d].empty()) continue;  // this detector keeps the defaults
      std::vector<ConditionsPayload>& ps = loaded[d];
      std::stable_sort(ps.begin(), ps.end(), [](const ConditionsPayload& a, const ConditionsPayload& b) {
        return std::pair(a.lo_exp, a.lo_run) < std::pair(b.lo_exp, b.lo_run);
      });
      for (size_t k = 1; k < ps.size(); ++k)
        if (std::pair(ps[k].lo_exp, ps[k].lo_run) <= std::pair(ps[k - 1].hi_exp, ps[k - 1].hi_run))
          throw std::runtime_error(path + ": " + ecl::detector_name(static_cast<ecl::Detector>(d)) +
                                   " payloads with overlapping intervals of validity " + ps[k - 1].iov + " and " +
                                   ps[k].iov);
      payloads_[d] = std::move(ps);
    }
    conditions_file_ = std::move(file);
  }

  // Reads one payload into loaded[its detector].
  void load_payload(const Json& doc, const std::string& where, std::vector<ConditionsPayload> (&loaded)[2]) {
    if (doc.kind != Json::Object) throw std::runtime_error(where + "a payload is a JSON object");
    const Json *det = nullptr, *gain = nullptr, *t0 = nullptr, *map = nullptr, *iov = nullptr;
    for (const auto& [k, v] : doc.members) {
      if (k == "detector") det = &v;
      else if (k == "gain") gain = &v;
      else if (k == "t0") t0 = &v;
      else if (k == "channel_map") map = &v;
      else if (k == "iov") iov = &v;
      else throw std::runtime_error(where + "unknown key '" + printable(k) + "' (detector, gain, t0, channel_map, iov)");
    }
    if (!det || det->kind != Json::String)
      throw std::runtime_error(where + "'detector' (\"belle2-ecl\" or \"array30\") is required");
    auto dd = ecl::detector_from_name(det->str);
    if (!dd) throw std::runtime_error(where + "unknown detector '" + printable(det->str) + "'");
    const int d = static_cast<int>(*dd);
    const int n_cells = ecl::Geometry::get(*dd).n_cells;
    std::vector<double> g, t;
    if (gain) g = number_array(*gain, "gain", n_cells, where);
    if (t0) t = number_array(*t0, "t0", n_cells, where);
    for (size_t k = 0; k < g.size(); ++k)  // E = amplitude / 20000 x gain: a gain <= 0 is no calibration
      if (!(g[k] > 0 && g[k] <= 1e6))
        throw std::runtime_error(where + "'gain'[" + std::to_string(k) + "] (cellId " + std::to_string(k + 1) +
                                 ") must be in (0, 1e6]");
    for (size_t k = 0; k < t.size(); ++k)
      if (std::fabs(t[k]) > 1e6)
        throw std::runtime_error(where + "'t0'[" + std::to_string(k) + "] (cellId " + std::to_string(k + 1) +
                                 ") is beyond 1 ms");
    ConditionsPayload p;
    p.calibration = ecl::Calibration::from(n_cells, g, t);
    if (map) {
      if (map->kind != Json::Array)
        throw std::runtime_error(where + "'channel_map' must be an array of [collector, shaper, channel]");
      std::vector<std::array<int, 3>> addr(map->items.size());
      for (size_t k = 0; k < map->items.size(); ++k) {
        const Json& a = map->items[k];
        const std::string what = where + "'channel_map'[" + std::to_string(k) + "] (cellId " + std::to_string(k + 1) + ")";
        if (a.kind != Json::Array || a.items.size() != 3)
          throw std::runtime_error(what + " must be [collector, shaper, channel]");
        addr[k] = {static_cast<int>(integer(a.items[0], 1, ecl::kMaxCollector, what + ": collector")),
                   static_cast<int>(integer(a.items[1], 1, ecl::kShapersPerCollector, what + ": shaper")),
                   static_cast<int>(integer(a.items[2], 0, ecl::kChannelsPerShaper - 1, what + ": channel"))};
      }
      try {
        p.channel_map = ecl::ChannelMap::from(n_cells, addr);
      } catch (const std::invalid_argument& e) {
        throw std::runtime_error(where + e.what());
      }
    }
    if (iov) {
      if (iov->kind != Json::Array || iov->items.size() != 4)
        throw std::runtime_error(where + "'iov' must be [exp_low, run_low, exp_high, run_high] (-1: open)");
      constexpr int64_t kMax = int64_t(1) << 53;
      const char* names[4] = {"exp_low", "run_low", "exp_high", "run_high"};
      int64_t b[4];
      for (int k = 0; k < 4; ++k) b[k] = integer(iov->items[k], -1, kMax, where + "'iov' " + names[k] + " (-1: open)");
      p.iov = "[" + std::to_string(b[0]) + ", " + std::to_string(b[1]) + ", " + std::to_string(b[2]) + ", " +
              std::to_string(b[3]) + "]";
      if ((b[0] < 0 && b[1] >= 0) || (b[2] < 0 && b[3] >= 0))
        throw std::runtime_error(where + "'iov' " + p.iov + ": a run bound needs its experiment (exp -1 with run -1)");
      constexpr uint64_t kOpen = std::numeric_limits<uint64_t>::max();
      p.lo_exp = b[0] < 0 ? 0 : b[0], p.lo_run = b[1] < 0 ? 0 : b[1];
      p.hi_exp = b[2] < 0 ? kOpen : b[2], p.hi_run = b[3] < 0 ? kOpen : b[3];
      if (std::pair(p.lo_exp, p.lo_run) > std::pair(p.hi_exp, p.hi_run))
        throw std::runtime_error(where + "'iov' " + p.iov + " ends before it starts");
    }
    loaded[d].push_back(std::move(p));
  }

  std::string conditions_;
  std::map<std::string, std::string> conditions_file_;  // {path, sha256} of the file loaded; empty: none
  std::vector<ConditionsPayload> payloads_[2];  // per detector, sorted, not overlapping
  std::atomic<uint64_t> digits_{0}, rejected_{0};
};

}  // namespace

ECLRECO_REGISTER_MODULE(ECLUnpacker, "ECLUnpacker",
                        "decodes the ECL payload of raw events into ECLDigits (cell, energy, time, quality, amplitude) "
                        "and ECLEventInformation (n_out_of_time_digits)")
