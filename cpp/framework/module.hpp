// The contract between a module and the framework: parameters plus the lifecycle
// initialize -> (begin_run -> event* -> end_run)* -> terminate. Modules never call each other;
// they meet in the EventBatch.
#pragma once
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "framework/event_batch.hpp"
#include "framework/parameters.hpp"

namespace fw {

// Thrown by a module to end the whole job instead of flagging events (a Python module's
// KeyboardInterrupt or SystemExit: the user stopping the program, not a bad event). The
// processor flags the events of that call with what(), reads no more, lets the batches in flight
// finish, ends the run, terminates every module and then rethrows cause() from process().
class AbortJob : public std::runtime_error {
 public:
  AbortJob(const std::string& what, std::exception_ptr cause) : std::runtime_error(what), cause_(std::move(cause)) {}
  const std::exception_ptr& cause() const { return cause_; }

 private:
  std::exception_ptr cause_;
};

class Module {
 public:
  virtual ~Module() = default;

  const std::string& type() const { return type_; }          // registered name, e.g. "ECLUnpacker"
  const std::string& description() const { return description_; }
  void set_identity(std::string type, std::string description) {
    type_ = std::move(type);
    description_ = std::move(description);
    params_.set_owner(type_);
  }
  Parameters& params() { return params_; }
  const Parameters& params() const { return params_; }

  virtual void initialize() {}
  virtual void begin_run(uint64_t /*exp*/, uint64_t /*run*/) {}
  virtual void event(EventBatch& /*batch*/) {}
  virtual void end_run(uint64_t /*exp*/, uint64_t /*run*/) {}
  virtual void terminate() {}

  // A source fills `batch` with up to max_events events; false once the data has ended (a last
  // non-empty batch may come with false). Sources must return regularly (poll stop_requested()).
  virtual bool is_source() const { return false; }
  virtual bool next_batch(EventBatch& /*batch*/, size_t /*max_events*/) { return false; }
  // A source whose input holds events that a stop would lose (a socket's receive queue) returns
  // true: after a stop request (SIGINT/SIGTERM) the processor keeps calling next_batch, and
  // processing what it returns, until it returns false; such a source bounds its own drain.
  virtual bool drains_at_stop() const { return false; }
  // Ordered modules (outputs) see batches one at a time in input order, also with threads > 1;
  // every module after the first ordered one in a path runs ordered too.
  virtual bool ordered() const { return false; }
  // Outputs (a file, a socket, the quarantine): the events they are given leave the process. A
  // module after one can no longer reject an event (the processor makes such a rejection a module
  // error): the event is already written, or, after the quarantine, would be in neither file.
  virtual bool writes_events() const { return false; }
  // Python modules need the interpreter lock (they take it for their own call only; the processor
  // runs them in the parallel stage like the others).
  virtual bool needs_gil() const { return false; }
  // Module-specific counters for monitoring (e.g. clusters corrected), read between batches.
  virtual std::map<std::string, double> counters() const { return {}; }
  // What the output file's metadata records of the module beside its parameters, which name a file
  // and not its content: {key: {field: value}}, e.g. ECLUnpacker's {"conditions": {"path": ..., "sha256":
  // ...}}, the digest of the bytes it parsed at initialize (a file changed after the job is still told
  // apart). Read after initialize (eclreco.framework.job_provenance); a Python module defines its own
  // provenance() (ECLEnergyCorrection's model files).
  using Provenance = std::map<std::string, std::map<std::string, std::string>>;
  virtual Provenance provenance() const { return {}; }

  // The collections the module adds to its batches (makes) and those it reads and cannot do without
  // (needs; Python's requires(): `requires` is a C++20 keyword), from its parameters; std::nullopt: not
  // said. A module that rewrites a collection made before it (filters its rows) needs it and does not
  // make it. An output of a job without events writes what the modules before it make (RootOutput's
  // branches); a module that does not say may add anything. The processor checks them at initialize
  // (processor.cpp, CollectionCheck): what a module needs is made by a module before it, and no two
  // modules make one collection.
  using Names = std::vector<std::string>;
  using Collections = std::optional<Names>;  // return Names{...} (a bare {} would be std::nullopt)
  virtual Collections makes() const { return std::nullopt; }
  virtual Collections needs() const { return std::nullopt; }

 private:
  std::string type_, description_;
  Parameters params_;
};

// A module's check, at the top of its event(), of the columns it reads in collection c. A column that
// a collection lacks is lacking in every batch (the module that makes it writes the same columns each
// time): a chain error as a collection that no module makes, which initialize refuses. Columns are not
// declared (makes()/needs() name collections, as basf2's isRequired does: what a custom source writes
// is known at its first batch, not before), so this ends the job at the first batch (AbortJob), with
// one message that names the module, the collection and the columns, instead of failing every event,
// each re-run on its own, with "no column 'ring'". Python modules call it as Module.require_columns.
inline void require_columns(const Module& m, const Collection& c, const std::vector<std::string>& names) {
  std::string lacking, wanted;
  for (const std::string& name : names) {
    wanted += (wanted.empty() ? "" : ", ") + name;
    if (!c.has(name)) lacking += (lacking.empty() ? "'" : ", '") + name + "'";
  }
  if (lacking.empty()) return;
  throw AbortJob(m.type() + " reads the columns " + wanted + " of the collection '" + c.name() + "', which has no " +
                     lacking + " (its columns: " + c.column_names() + "): the module that makes '" +
                     c.name() + "' must write them; the job ends at its first batch",
                 nullptr);
}

}  // namespace fw
