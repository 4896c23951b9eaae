// The event loop: pulls batches from the path's source, splits them at run boundaries, runs the
// modules (concurrently on `threads` batches, outputs in input order) and keeps the accounting
// received = processed + rejected.
#pragma once
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "framework/module.hpp"

namespace fw {

class Path {
 public:
  void add(std::shared_ptr<Module> m) { modules_.push_back(std::move(m)); }
  const std::vector<std::shared_ptr<Module>>& modules() const { return modules_; }

 private:
  std::vector<std::shared_ptr<Module>> modules_;
};

struct ProcessOptions {
  uint64_t max_events = 0;  // 0: until the source ends
  int threads = 1;
  int64_t batch_size = 256;
  bool install_signal_handlers = true;  // SIGINT/SIGTERM end the run cleanly

  // Bounds: a thread per core is the sensible most (a typo of 30000 threads would take the
  // machine down before the first event); a batch of a million events is ~6 GB of raw data.
  static constexpr int kMaxThreads = 256;
  static constexpr int64_t kMaxBatchSize = int64_t(1) << 20;
  void validate() const;  // std::invalid_argument when out of bounds
};

// Upper bounds (seconds) of the per-batch module time histogram; the last bucket is +Inf.
constexpr std::array<double, 14> kBatchSecondsBuckets = {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2,
                                                         3e-2, 0.1,  0.3,  1.0,  3.0,  10.0, 30.0};

struct ModuleCounters {
  std::string name;
  // nanoseconds: wall time in the module; cpu_nanoseconds: CPU time of the calling thread in it
  // (less than the wall time when the thread waits or the machine's cores are shared; helper
  // threads a module starts, e.g. RootOutput's writer, are not counted)
  std::atomic<uint64_t> calls{0}, events{0}, nanoseconds{0}, cpu_nanoseconds{0};
  // the module errors it gave events (it raised on them, or rejected them after an output): the job's
  // `errors` counts events, whichever module failed; this says which one (an output whose write failed
  // raises on every event it is given after, apart from the errors of the modules before it)
  std::atomic<uint64_t> errors{0};
  std::array<std::atomic<uint64_t>, kBatchSecondsBuckets.size() + 1> batch_seconds_hist{};
};

// Live counters of a processing run, safe to read from another thread (metrics exporter).
class ProcessState {
 public:
  // processed counts the discarded events too (they went through the path up to their filter)
  std::atomic<uint64_t> received{0}, processed{0}, rejected{0}, discarded{0}, errors{0}, batches{0};
  std::atomic<uint64_t> batches_in_flight{0};
  std::atomic<bool> running{false};
  std::atomic<double> start_time{0.0}, wall_seconds{0.0};
  std::atomic<double> loop_seconds{0.0};  // the event loop alone: wall time minus initialize/terminate
  std::vector<std::unique_ptr<ModuleCounters>> modules;  // filled before the state is published, then fixed
  std::array<std::atomic<uint64_t>, 12> events_per_batch_hist{};  // buckets 1,2,4,...,1024,+Inf

  std::map<std::string, uint64_t> rejected_by_reason() const;
  void count_rejection(const std::string& reason);
  std::map<std::string, uint64_t> discarded_by_reason() const;
  void count_discards(const std::map<size_t, std::string>& discards);  // one batch's, under one lock
  std::vector<std::string> error_messages() const;  // the first module errors, for the summary
  void record_error(const std::string& message);
  // The error that ended the run (a module's initialize, begin_run or end_run, the source, a job
  // aborted by a module), known before the modules' terminate, so that an output's file can say
  // that its job failed; or a module's terminate (known to the outputs terminated after it); "" when none.
  std::string fatal_error() const;
  void set_fatal_error(const std::string& message);  // the first one is kept

 private:
  mutable std::mutex mu_;
  std::map<std::string, uint64_t> rejected_by_reason_;
  std::map<std::string, uint64_t> discarded_by_reason_;
  std::vector<std::string> error_messages_;
  std::string fatal_error_;
};

// Request that a running process() ends after the batches in flight (what SIGINT/SIGTERM do).
// output_failed: an output can keep no more events (a full disk): a source that reads on after a stop
// (ZMQInput's drain) reads nothing more, since what it read would be lost.
void request_stop(bool output_failed = false);
bool stop_requested();
// Whether an output asked for the stop of this run (request_stop(true)).
bool output_failed();
void clear_stop();
// The signal (SIGINT, SIGTERM) that stopped the last run (one with signal handlers installed); 0 if none.
int stop_signal();

class Processor {
 public:
  Processor();
  // Safe from another thread (the metrics exporter's, during process()): the pointer is replaced by
  // process() under a lock, once its new state is complete (modules named), and never changed after.
  std::shared_ptr<ProcessState> state() const;
  // Runs the path to the end of its source, max_events, or a stop request.
  void process(Path& path, const ProcessOptions& options);
  // basf2-like table: calls, events, total time and time per event for every module.
  std::string statistics_table() const;

 private:
  mutable std::mutex state_mu_;
  std::shared_ptr<ProcessState> state_;
};

}  // namespace fw
