// A batch of events in columnar form: per-event metadata columns plus named collections, each
// a set of columns with per-event offsets (event i owns rows offsets[i]..offsets[i+1]).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "framework/column.hpp"

namespace fw {

// Bits of the per-event error_flags column.
enum ErrorFlag : uint32_t {
  kRejected = 1u << 0,      // input could not be decoded; see rejection reason
  kModuleError = 1u << 1,   // a module raised while processing this event
  kDiscarded = 1u << 2,     // a filter module decided not to keep it; see discard reason
};

struct Rejection {
  std::string reason;  // short machine-readable code, e.g. "crc_mismatch" (metrics label)
  std::string detail;  // human-readable explanation
};

class Collection {
 public:
  // name: the collection's name in its batch (EventBatch gives it), for the errors that name it
  explicit Collection(size_t n_events = 0, std::string name = {});
  const std::string& name() const { return name_; }
  size_t n_events() const { return offsets_.rows() - 1; }
  size_t n_rows() const { return static_cast<size_t>(offsets()[n_events()]); }
  const int64_t* offsets() const { return offsets_.data<int64_t>(); }
  int64_t* offsets() { return offsets_.data<int64_t>(); }
  Column& offsets_column() { return offsets_; }
  const Column& offsets_column() const { return offsets_; }

  bool has(const std::string& name) const { return columns_.count(name) != 0; }
  Column& column(const std::string& name);
  const Column& column(const std::string& name) const;
  // Adds (or replaces) a column sized to the current number of rows.
  template <class T>
  Column& add_column(const std::string& name, std::vector<int64_t> inner_shape = {}) {
    return put_column(name, Column::of<T>(n_rows(), std::move(inner_shape)));
  }
  // Adds (or replaces) a column that has n_rows() rows (std::length_error naming both otherwise).
  Column& set_column(const std::string& name, Column c);
  // Adds (or replaces) a column without the row check, for builders that set the offsets after
  // filling the columns. The one place where a column gets its name (for its dtype errors).
  Column& put_column(const std::string& name, Column c);
  std::map<std::string, Column>& columns() { return columns_; }
  const std::map<std::string, Column>& columns() const { return columns_; }
  // "a, b, c" (or "none"): the columns a missing one's error lists
  std::string column_names() const;
  // Sets offsets from per-event counts and resizes every column to the new row total.
  void set_counts(const std::vector<int64_t>& counts);

 private:
  Column offsets_;
  std::map<std::string, Column> columns_;
  std::string name_;
};

class EventBatch {
 public:
  explicit EventBatch(size_t n_events = 0);

  size_t size() const { return n_; }
  void resize(size_t n);  // metadata columns grow with zeros; collections must be rebuilt

  uint64_t sequence = 0;  // position in the input stream, set by the processor

  // Per-event metadata.
  // exp and run: any unsigned 64-bit int (the wire format bounds only evt, to 32 bits)
  uint64_t* exp() { return exp_.data<uint64_t>(); }
  uint64_t* run() { return run_.data<uint64_t>(); }
  uint32_t* evt() { return evt_.data<uint32_t>(); }
  int64_t* time_ns() { return time_ns_.data<int64_t>(); }
  uint32_t* error_flags() { return flags_.data<uint32_t>(); }
  uint8_t* detector() { return det_.data<uint8_t>(); }
  const uint64_t* exp() const { return exp_.data<uint64_t>(); }
  const uint64_t* run() const { return run_.data<uint64_t>(); }
  const uint32_t* evt() const { return evt_.data<uint32_t>(); }
  const int64_t* time_ns() const { return time_ns_.data<int64_t>(); }
  const uint32_t* error_flags() const { return flags_.data<uint32_t>(); }
  const uint8_t* detector() const { return det_.data<uint8_t>(); }
  // name -> column, for generic access (bindings, output writers).
  std::map<std::string, Column*> metadata();
  std::map<std::string, const Column*> metadata() const;

  // Rejected events stay in the batch (so that their bytes can be quarantined) but carry the
  // kRejected flag; modules skip them.
  // i < size() (std::out_of_range otherwise), as for flag_error and select; a non-empty reason;
  // an event rejected twice keeps its first reason (the cause; later modules skip it anyway)
  void reject(size_t i, std::string reason, std::string detail);
  bool is_rejected(size_t i) const { return error_flags()[i] & kRejected; }
  const std::map<size_t, Rejection>& rejections() const { return rejections_; }
  // Takes a rejection back (the processor, for a module that may no longer reject): the event is
  // no longer rejected; returns what the rejection said (std::out_of_range if it was not rejected).
  Rejection withdraw_rejection(size_t i);
  // An event filter's decision (an HLT selection): the event was processed up to the filter and
  // is counted, by reason, as processed and discarded; later modules and outputs skip it. A
  // rejected event stays rejected (no decision on it), a second discard keeps the first reason.
  void discard(size_t i, std::string reason);
  const std::map<size_t, std::string>& discards() const { return discards_; }
  // What modules skip: rejected (nothing to work on) and discarded events.
  bool skips(size_t i) const { return error_flags()[i] & (kRejected | kDiscarded); }
  // Module errors: the event is flagged, the message kept.
  void flag_error(size_t i, std::string message);
  const std::map<size_t, std::string>& errors() const { return errors_; }

  bool has(const std::string& name) const { return collections_.count(name) != 0; }
  Collection& get(const std::string& name);
  const Collection& get(const std::string& name) const;
  Collection& add(const std::string& name);  // new empty collection (all events 0 rows)
  void remove(const std::string& name) { collections_.erase(name); }
  std::map<std::string, Collection>& collections() { return collections_; }
  const std::map<std::string, Collection>& collections() const { return collections_; }

  // Copies of a subset of events / a concatenation, used to split batches at run boundaries
  // and to isolate an event that makes a module fail.
  EventBatch select(const std::vector<size_t>& events) const;
  // Parts with rows of a column must agree on its dtype and inner shape (std::invalid_argument
  // naming the column otherwise); a part without rows of it takes no part in that.
  static EventBatch concat(const std::vector<EventBatch>& parts);

 private:
  void check_index(size_t i) const;
  size_t n_ = 0;
  Column exp_, run_, evt_, time_ns_, flags_, det_;
  std::map<size_t, Rejection> rejections_;
  std::map<size_t, std::string> errors_;
  std::map<size_t, std::string> discards_;
  std::map<std::string, Collection> collections_;
};

}  // namespace fw
