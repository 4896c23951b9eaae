#include "framework/event_batch.hpp"

#include <stdexcept>
#include <utility>

namespace fw {

Collection::Collection(size_t n_events, std::string name)
    : offsets_(Column::of<int64_t>(n_events + 1)), name_(std::move(name)) {}

// "a, b, c" (or "none"): the names a missing one's error lists, so that a misspelt name is seen at once.
template <class Map>
static std::string names_of(const Map& m) {
  std::string have;
  for (const auto& [k, v] : m) have += (have.empty() ? "" : ", ") + k;
  return have.empty() ? std::string("none") : have;
}

// The collection's name where the batch gave it one, and the columns it has (a custom source's
// ECLClusters without 'ring', say).
std::string Collection::column_names() const { return names_of(columns_); }

[[noreturn]] static void no_column(const std::string& name, const Collection& c) {
  throw std::out_of_range("no column '" + name + "' in the collection" + (c.name().empty() ? "" : " '" + c.name() + "'") +
                          " (its columns: " + c.column_names() + ")");
}

[[noreturn]] static void no_collection(const std::string& name, const std::map<std::string, Collection>& collections) {
  throw std::out_of_range("no collection '" + name + "' in the batch (its collections: " + names_of(collections) + ")");
}

Column& Collection::column(const std::string& name) {
  auto it = columns_.find(name);
  if (it == columns_.end()) no_column(name, *this);
  return it->second;
}

const Column& Collection::column(const std::string& name) const {
  auto it = columns_.find(name);
  if (it == columns_.end()) no_column(name, *this);
  return it->second;
}

Column& Collection::set_column(const std::string& name, Column c) {
  if (c.rows() != n_rows())
    throw std::length_error("column '" + name + "' has " + std::to_string(c.rows()) + " rows, " +
                            (name_.empty() ? std::string("collection") : "collection '" + name_ + "'") + " has " +
                            std::to_string(n_rows()));
  return put_column(name, std::move(c));
}

Column& Collection::put_column(const std::string& name, Column c) {
  Column& out = columns_[name] = std::move(c);
  out.set_name(name);
  return out;
}

void Collection::set_counts(const std::vector<int64_t>& counts) {
  offsets_.resize(counts.size() + 1);
  int64_t* off = offsets_.data<int64_t>();
  off[0] = 0;
  for (size_t i = 0; i < counts.size(); ++i) off[i + 1] = off[i] + counts[i];
  for (auto& [name, col] : columns_) col.resize(static_cast<size_t>(off[counts.size()]));
}

EventBatch::EventBatch(size_t n)
    : exp_(Column::of<uint64_t>()), run_(Column::of<uint64_t>()), evt_(Column::of<uint32_t>()),
      time_ns_(Column::of<int64_t>()), flags_(Column::of<uint32_t>()), det_(Column::of<uint8_t>()) {
  resize(n);
}

void EventBatch::resize(size_t n) {
  n_ = n;
  for (auto* c : {&exp_, &run_, &evt_, &time_ns_, &flags_, &det_}) c->resize(n);
}

std::map<std::string, Column*> EventBatch::metadata() {
  return {{"exp", &exp_}, {"run", &run_}, {"evt", &evt_}, {"time_ns", &time_ns_},
          {"error_flags", &flags_}, {"detector", &det_}};
}

std::map<std::string, const Column*> EventBatch::metadata() const {
  return {{"exp", &exp_}, {"run", &run_}, {"evt", &evt_}, {"time_ns", &time_ns_},
          {"error_flags", &flags_}, {"detector", &det_}};
}

void EventBatch::check_index(size_t i) const {
  if (i >= n_) throw std::out_of_range("event index " + std::to_string(i) + " out of range (batch of " +
                                       std::to_string(n_) + " events)");
}

void EventBatch::reject(size_t i, std::string reason, std::string detail) {
  check_index(i);
  if (reason.empty()) throw std::invalid_argument("reject: a rejection needs a reason (its counter's label)");
  error_flags()[i] |= kRejected;
  rejections_.emplace(i, Rejection{std::move(reason), std::move(detail)});  // the first reason stays
}

Rejection EventBatch::withdraw_rejection(size_t i) {
  auto it = rejections_.find(i);
  if (it == rejections_.end()) throw std::out_of_range("event index " + std::to_string(i) + " is not rejected");
  Rejection r = std::move(it->second);
  rejections_.erase(it);
  error_flags()[i] &= ~kRejected;
  return r;
}

void EventBatch::discard(size_t i, std::string reason) {
  check_index(i);
  if (reason.empty()) throw std::invalid_argument("discard: a discarded event needs a reason (its counter's label)");
  if (is_rejected(i)) return;
  error_flags()[i] |= kDiscarded;
  discards_.emplace(i, std::move(reason));
}

void EventBatch::flag_error(size_t i, std::string message) {
  check_index(i);
  error_flags()[i] |= kModuleError;
  errors_[i] = std::move(message);
}

Collection& EventBatch::get(const std::string& name) {
  auto it = collections_.find(name);
  if (it == collections_.end()) no_collection(name, collections_);
  return it->second;
}

const Collection& EventBatch::get(const std::string& name) const {
  auto it = collections_.find(name);
  if (it == collections_.end()) no_collection(name, collections_);
  return it->second;
}

Collection& EventBatch::add(const std::string& name) {
  return collections_[name] = Collection(n_, name);
}

EventBatch EventBatch::select(const std::vector<size_t>& events) const {
  for (size_t i : events) check_index(i);
  EventBatch out(0);
  auto src = metadata();
  auto dst = out.metadata();
  for (auto& [name, col] : src)
    for (size_t i : events) dst[name]->append_rows(*col, i, i + 1);
  out.n_ = events.size();
  for (size_t k = 0; k < events.size(); ++k) {
    auto r = rejections_.find(events[k]);
    if (r != rejections_.end()) out.rejections_[k] = r->second;
    auto e = errors_.find(events[k]);
    if (e != errors_.end()) out.errors_[k] = e->second;
    auto d = discards_.find(events[k]);
    if (d != discards_.end()) out.discards_[k] = d->second;
  }
  for (const auto& [name, coll] : collections_) {
    Collection c(0, name);
    std::vector<int64_t> counts;
    counts.reserve(events.size());
    for (size_t i : events) counts.push_back(coll.offsets()[i + 1] - coll.offsets()[i]);
    for (const auto& [cname, col] : coll.columns()) {
      Column nc(col.dtype(), col.inner_shape());
      for (size_t i : events) nc.append_rows(col, coll.offsets()[i], coll.offsets()[i + 1]);
      c.put_column(cname, std::move(nc));
    }
    // Offsets only: the columns already hold the selected rows.
    Column& off = c.offsets_column();
    off.resize(counts.size() + 1);
    int64_t* o = off.data<int64_t>();
    o[0] = 0;
    for (size_t k = 0; k < counts.size(); ++k) o[k + 1] = o[k] + counts[k];
    out.collections_.emplace(name, std::move(c));
  }
  out.sequence = sequence;
  return out;
}

// "float32", "float32[7x7]": a column's dtype and inner shape, for concat's error.
static std::string layout_name(const Column& c) {
  std::string s = dtype_name(c.dtype());
  for (size_t k = 0; k < c.inner_shape().size(); ++k)
    s += (k ? "x" : "[") + std::to_string(c.inner_shape()[k]) + (k + 1 == c.inner_shape().size() ? "]" : "");
  return s;
}

EventBatch EventBatch::concat(const std::vector<EventBatch>& parts) {
  EventBatch out(0);
  if (parts.empty()) return out;
  out.sequence = parts.front().sequence;
  auto dst = out.metadata();
  // Union of collection names and their column layouts: a part may lack a collection (for
  // instance when a module failed on it), which then contributes empty events. A part without rows
  // does not decide a column's dtype and shape (a Python module's column made from an event's empty
  // list is float64 whatever the other events' lists hold); parts with rows must agree.
  std::map<std::string, std::map<std::string, const Column*>> layout;
  for (const auto& p : parts)
    for (const auto& [name, coll] : p.collections_)
      for (const auto& [cname, col] : coll.columns()) {
        auto [it, added] = layout[name].emplace(cname, &col);
        const Column& have = *it->second;
        if (added || col.rows() == 0 || (have.dtype() == col.dtype() && have.inner_shape() == col.inner_shape()))
          continue;
        if (have.rows() == 0) {
          it->second = &col;
          continue;
        }
        throw std::invalid_argument("column '" + name + "." + cname + "' is " + layout_name(have) + " in one part, " +
                                    layout_name(col) + " in another");
      }
  for (const auto& [name, cols] : layout) {
    Collection c(0, name);
    for (const auto& [cname, col] : cols) c.put_column(cname, Column(col->dtype(), col->inner_shape()));
    out.collections_.emplace(name, std::move(c));
  }
  std::map<std::string, std::vector<int64_t>> counts;
  for (const auto& p : parts) {
    const size_t base = out.n_;
    for (auto& [name, col] : p.metadata()) dst[name]->append_rows(*col, 0, p.n_);
    for (const auto& [k, r] : p.rejections_) out.rejections_[base + k] = r;
    for (const auto& [k, e] : p.errors_) out.errors_[base + k] = e;
    for (const auto& [k, d] : p.discards_) out.discards_[base + k] = d;
    out.n_ += p.n_;
    for (auto& [name, coll] : out.collections_) {
      auto it = p.collections_.find(name);
      auto& cnt = counts[name];
      if (it == p.collections_.end()) {
        cnt.insert(cnt.end(), p.n_, 0);
        continue;
      }
      const Collection& src = it->second;
      for (size_t i = 0; i < p.n_; ++i) cnt.push_back(src.offsets()[i + 1] - src.offsets()[i]);
      const size_t rows = src.n_rows();
      if (rows == 0) continue;  // nothing to append; its columns may have another dtype (see above)
      for (auto& [cname, col] : coll.columns()) {
        if (src.has(cname))
          col.append_rows(src.column(cname), 0, rows);
        else
          col.resize(col.rows() + rows);
      }
    }
  }
  for (auto& [name, coll] : out.collections_) {
    Column& off = coll.offsets_column();
    const auto& cnt = counts[name];
    off.resize(cnt.size() + 1);
    int64_t* o = off.data<int64_t>();
    o[0] = 0;
    for (size_t k = 0; k < cnt.size(); ++k) o[k + 1] = o[k] + cnt[k];
  }
  return out;
}

}  // namespace fw
