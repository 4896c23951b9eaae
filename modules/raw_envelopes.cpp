#include "raw_envelopes.hpp"

#include <cstring>

namespace rawdata {

namespace {

// Grows a collection of `old_n` events by `n` events of `rows_each` rows (nullptr: 0 rows).
void extend_offsets(fw::Collection& c, size_t old_n, size_t n, const size_t* rows) {
  fw::Column& off = c.offsets_column();
  off.resize(old_n + n + 1);
  int64_t* o = off.data<int64_t>();
  for (size_t k = 0; k < n; ++k) o[old_n + k + 1] = o[old_n + k] + static_cast<int64_t>(rows ? rows[k] : 0);
}

}  // namespace

void append_decoded(fw::EventBatch& batch, const MessageRef* messages, const ecl::Envelope* env, size_t n) {
  const size_t old_n = batch.size();
  // Other collections must keep one entry per event: new events get empty entries.
  for (auto& [name, coll] : batch.collections())
    if (coll.n_events() == old_n && name != "RawEnvelopes" && name != "RawPayloadRef") {
      extend_offsets(coll, old_n, n, nullptr);
    }
  const bool had_raw = batch.has("RawEnvelopes"), had_ref = batch.has("RawPayloadRef");
  batch.resize(old_n + n);

  size_t total = 0;
  for (size_t k = 0; k < n; ++k) total += messages[k].size;

  // RawEnvelopes
  fw::Collection& raw = had_raw ? batch.get("RawEnvelopes") : batch.add("RawEnvelopes");
  if (!had_raw) {
    raw.offsets_column().resize(old_n + 1);  // any old events: no bytes
    raw.add_column<uint8_t>("bytes");
  }
  fw::Column& bytes = raw.column("bytes");
  const size_t base = bytes.rows();
  bytes.resize(base + total);
  {
    uint8_t* dst = bytes.data<uint8_t>() + base;
    for (size_t k = 0; k < n; ++k) {
      if (messages[k].size) std::memcpy(dst, messages[k].data, messages[k].size);
      dst += messages[k].size;
    }
    fw::Column& off = raw.offsets_column();
    off.resize(old_n + n + 1);
    int64_t* o = off.data<int64_t>();
    for (size_t k = 0; k < n; ++k) o[old_n + k + 1] = o[old_n + k] + static_cast<int64_t>(messages[k].size);
  }

  // RawPayloadRef: one row per event.
  fw::Collection& ref = had_ref ? batch.get("RawPayloadRef") : batch.add("RawPayloadRef");
  if (!had_ref) {
    std::vector<int64_t> counts(old_n + n, 1);
    ref.set_counts(counts);
    ref.add_column<int64_t>("offset");
    ref.add_column<int64_t>("size");
    ref.add_column<uint8_t>("known");
  } else {
    const size_t rows = ref.n_rows();
    std::vector<size_t> ones(n, 1);
    extend_offsets(ref, old_n, n, ones.data());
    for (auto& [cname, col] : ref.columns()) col.resize(rows + n);
  }
  const size_t rbase = ref.n_rows() - n;
  int64_t* r_off = ref.column("offset").data<int64_t>() + rbase;
  int64_t* r_size = ref.column("size").data<int64_t>() + rbase;
  uint8_t* r_known = ref.column("known").data<uint8_t>() + rbase;

  uint64_t* exp = batch.exp();
  uint64_t* run = batch.run();
  uint32_t* evt = batch.evt();
  int64_t* tns = batch.time_ns();
  uint8_t* det = batch.detector();
  for (size_t k = 0; k < n; ++k) {
    const ecl::Envelope& e = env[k];
    const size_t i = old_n + k;
    exp[i] = e.exp;
    run[i] = e.run;
    evt[i] = e.evt;
    tns[i] = e.has_time ? e.time_ns : 0;
    det[i] = e.detector;
    r_known[k] = e.known;
    if (e.ok()) {
      r_off[k] = static_cast<int64_t>(e.payload_offset);
      r_size[k] = static_cast<int64_t>(e.payload_size);
    } else {
      r_off[k] = 0;
      r_size[k] = 0;
      batch.reject(i, e.reason, e.detail);
    }
  }
}

void append_envelopes(fw::EventBatch& batch, const MessageRef* messages, size_t n) {
  std::vector<ecl::Envelope> env(n);
  for (size_t k = 0; k < n; ++k) env[k] = ecl::decode_envelope(messages[k].data, messages[k].size);
  append_decoded(batch, messages, env.data(), n);
}

}  // namespace rawdata
