#include "framework/processor.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <ctime>
#include <cstdio>
#include <deque>
#include <iomanip>
#include <map>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "framework/heap.hpp"

namespace fw {

namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signals{0};
std::atomic<int> g_stop_signal{0};  // the first SIGINT/SIGTERM of the last run (0: none)
std::atomic<bool> g_output_failed{false};  // an output that cannot write asked for the stop
// The parent at the start of the run, when it asked for a signal at its death (PR_SET_PDEATHSIG:
// the roles `hlt run` starts); 0 otherwise.
std::atomic<pid_t> g_watched_parent{0};

extern "C" void on_signal(int sig, siginfo_t* info, void*) {
  int none = 0;
  g_stop_signal.compare_exchange_strong(none, sig);
  g_stop.store(true);
  // The kernel sends the parent-death signal again each time it reparents us while the parent's
  // threads exit: those repeats are one request to stop, not a second signal. (The supervisor itself
  // never relies on a second signal: it kills with SIGKILL.)
  const pid_t parent = g_watched_parent.load();
  if (parent > 0 && info && info->si_pid == parent) return;
  // A second signal gets the default action: a stuck run can still be interrupted. This one too:
  // resetting the action alone left it to a third signal (raise is async-signal-safe; the signal,
  // blocked while its handler runs, is delivered when the handler returns).
  if (g_signals.fetch_add(1) >= 1) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
  }
}

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

// CPU time of the calling thread (ns).
uint64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// Wall and thread-CPU time at the start of a module call.
struct CallStart {
  std::chrono::steady_clock::time_point wall = std::chrono::steady_clock::now();
  uint64_t cpu = thread_cpu_ns();
};

// Restores the previous SIGINT/SIGTERM handlers when a run ends.
class SignalGuard {
 public:
  explicit SignalGuard(bool install) : installed_(install) {
    if (!installed_) return;
    g_signals = 0;
    int pdeath = 0;
#ifdef __linux__
    if (prctl(PR_GET_PDEATHSIG, &pdeath) != 0) pdeath = 0;
#endif
    g_watched_parent = pdeath != 0 ? getppid() : 0;
    struct sigaction sa {};
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~SignalGuard() {
    if (!installed_) return;
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  bool installed_;
  struct sigaction old_int_ {}, old_term_ {};
};

std::string event_id(const EventBatch& b, size_t i) {
  return "exp " + std::to_string(b.exp()[i]) + " run " + std::to_string(b.run()[i]) + " evt " +
         std::to_string(b.evt()[i]);
}

}  // namespace

void request_stop(bool output_failed) {
  if (output_failed) g_output_failed.store(true);
  g_stop.store(true);
}
bool stop_requested() { return g_stop.load(std::memory_order_relaxed); }
bool output_failed() { return g_output_failed.load(); }
void clear_stop() {
  g_stop.store(false);
  g_output_failed.store(false);
}
int stop_signal() { return g_stop_signal.load(); }

std::map<std::string, uint64_t> ProcessState::rejected_by_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return rejected_by_reason_;
}

void ProcessState::count_rejection(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  ++rejected_by_reason_[reason];
}

std::map<std::string, uint64_t> ProcessState::discarded_by_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return discarded_by_reason_;
}

void ProcessState::count_discards(const std::map<size_t, std::string>& discards) {
  if (discards.empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [i, reason] : discards) ++discarded_by_reason_[reason];
  }
  discarded += discards.size();
}

std::vector<std::string> ProcessState::error_messages() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_messages_;
}

void ProcessState::record_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_messages_.size() < 100) error_messages_.push_back(message);
}

std::string ProcessState::fatal_error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fatal_error_;
}

void ProcessState::set_fatal_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (fatal_error_.empty()) fatal_error_ = message.empty() ? "unknown error" : message;
}

void ProcessOptions::validate() const {
  if (threads < 1 || threads > kMaxThreads)
    throw std::invalid_argument("threads must be 1.." + std::to_string(kMaxThreads) + ", not " +
                                std::to_string(threads));
  if (batch_size < 1 || batch_size > kMaxBatchSize)
    throw std::invalid_argument("batch_size must be 1.." + std::to_string(kMaxBatchSize) + ", not " +
                                std::to_string(batch_size));
}

Processor::Processor() : state_(std::make_shared<ProcessState>()) {}

std::shared_ptr<ProcessState> Processor::state() const {
  std::lock_guard<std::mutex> lock(state_mu_);
  return state_;
}

namespace {

// What the path's modules say they make and need (Module::makes, needs), checked module by module at
// initialize, after the module's own initialize (which validates the parameters the names come from),
// as basf2's isRequired: a collection that no module before it makes failed every event of the job, one
// at a time, instead; a second module making a collection replaced the first one's silently. A module
// that does not say is never refused, and after one that does not say what it makes (it may make
// anything) no collection is missing.
class CollectionCheck {
 public:
  explicit CollectionCheck(const std::vector<std::shared_ptr<Module>>& modules) : modules_(modules) {}

  void check(size_t k) {
    const Module& m = *modules_[k];
    if (const Module::Collections needs = m.needs(); needs && !unknown_maker_)
      for (const std::string& name : *needs)
        if (!made_by_.count(name)) throw std::invalid_argument(missing(k, name));
    const Module::Collections makes = m.makes();
    if (!makes) {
      unknown_maker_ = true;
      return;
    }
    for (const std::string& name : *makes) {
      const auto [it, first] = made_by_.emplace(name, k);
      if (it->second != k)  // the second would replace the first's collection without a word
        throw std::invalid_argument(
            named(k) + " makes the collection '" + name + "', which " + named(it->second) + " makes already: it "
            "would replace it; give one of them another name (a parameter such as ECLClusterizer's output), or "
            "leave one out (a module that rewrites a collection made before it requires it and does not make it)");
      if (first) made_.emplace_back(name, k);
    }
  }

 private:
  std::string named(size_t k) const {
    return modules_[k]->type() + " (module " + std::to_string(k + 1) + " of the path)";
  }

  std::string missing(size_t k, const std::string& name) const {
    std::string msg = named(k) + " requires the collection '" + name + "', which no module before it makes";
    for (size_t j = k + 1; j < modules_.size(); ++j) {
      // a hint only: a later module not yet initialized may fail to say (a Python makes() that reads an
      // attribute its initialize sets); its exception would replace this message
      Module::Collections later;
      try {
        later = modules_[j]->makes();
      } catch (...) {
        continue;
      }
      if (later && std::find(later->begin(), later->end(), name) != later->end()) {
        msg += ": " + named(j) + " makes it, after it";
        break;
      }
    }
    if (made_.empty()) return msg + " (no module before it makes a collection)";
    msg += " (made before it: ";
    for (size_t i = 0; i < made_.size(); ++i) {
      const bool first_of_module = i == 0 || made_[i - 1].second != made_[i].second;
      const bool last_of_module = i + 1 == made_.size() || made_[i + 1].second != made_[i].second;
      msg += (i == 0 ? "" : first_of_module ? "; " : ", ") + made_[i].first;
      if (last_of_module) msg += " by " + modules_[made_[i].second]->type();
    }
    return msg + ")";
  }

  const std::vector<std::shared_ptr<Module>>& modules_;
  std::map<std::string, size_t> made_by_;              // collection -> the module that makes it
  std::vector<std::pair<std::string, size_t>> made_;   // the same in path order, for the message
  bool unknown_maker_ = false;
};

// One run of process(): the state that the stages share.
class Run {
 public:
  Run(Path& path, const ProcessOptions& opt, ProcessState& st)
      : modules_(path.modules()), opt_(opt), st_(st) {
    if (modules_.empty() || !modules_.front()->is_source())
      throw std::invalid_argument("a path needs an input module (a source) as its first module");
    for (size_t i = 1; i < modules_.size(); ++i)
      if (modules_[i]->is_source())
        throw std::invalid_argument("a path takes one input module; '" + modules_[i]->type() +
                                    "' is a second one");
    first_ordered_ = modules_.size();
    for (size_t i = 1; i < modules_.size(); ++i)
      if (modules_[i]->ordered()) {
        first_ordered_ = i;
        break;
      }
    first_writer_ = modules_.size();
    for (size_t i = 1; i < modules_.size(); ++i)
      if (modules_[i]->writes_events()) {
        first_writer_ = i;
        break;
      }
  }

  void execute() {
    size_t initialized = 0;
    try {
      CollectionCheck collections(modules_);
      for (auto& m : modules_) {
        m->params().check_required();
        lifecycle(*m, "initialize", [&] { m->initialize(); });
        collections.check(initialized++);
      }
    } catch (...) {
      // The modules initialized before the one that failed get their terminate: an output closes
      // the file it created (a RootOutput before a failing RejectedOutput left a ROOT file without
      // keys in place of the one of that name), a socket is released; the first error is raised.
      std::exception_ptr first = std::current_exception();
      st_.set_fatal_error(describe(first));
      for (size_t k = 0; k < initialized; ++k)
        guarded(*modules_[k], "terminate", [&] { modules_[k]->terminate(); }, first);
      rethrow_unwrapped(first);
    }
    const double loop_start = now_seconds();
    const int n_threads = opt_.threads;
    if (n_threads > 1)
      for (int t = 0; t < n_threads; ++t) workers_.emplace_back([this] { worker_loop(); });
    std::exception_ptr fatal;
    try {
      read_loop();
    } catch (...) {
      fatal = std::current_exception();
    }
    drain();
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;
    }
    queue_cv_.notify_all();
    for (auto& w : workers_) w.join();
    st_.loop_seconds = now_seconds() - loop_start;
    // Every module gets its end_run and terminate even when one of them fails (an output that
    // cannot write must not keep the others from closing their files); the first error wins.
    end_run_all(fatal);
    std::exception_ptr ended_by = fatal;
    if (!ended_by) {
      std::lock_guard<std::mutex> lock(abort_mu_);
      ended_by = abort_;
    }
    if (ended_by) st_.set_fatal_error(describe(ended_by));
    for (auto& m : modules_) {
      guarded(*m, "terminate", [&] { m->terminate(); }, fatal);
      // a terminate that fails ends the job with an error too (an output that could not close its file):
      // known at once, so that the outputs terminated after it say so in their files
      if (fatal) st_.set_fatal_error(describe(fatal));
    }
    {
      std::lock_guard<std::mutex> lock(abort_mu_);
      if (!fatal) fatal = abort_;
    }
    if (fatal) rethrow_unwrapped(fatal);
  }

 private:
  // An AbortJob leaves process() as the module's own exception (Python's SystemExit).
  [[noreturn]] static void rethrow_unwrapped(std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const AbortJob& a) {
      if (a.cause()) std::rethrow_exception(a.cause());
      throw;
    }
  }

  static std::string describe(std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      return x.what();
    } catch (...) {
      return "unknown error";
    }
  }

  static constexpr uint64_t kErrorsPrinted = 20;
  static constexpr const char* kNotStdException = "an exception not derived from std::exception";
  std::atomic<uint64_t> errors_printed_{0};

  template <class F>
  void lifecycle(Module& m, const char* what, F&& f) {
    try {
      f();
    } catch (const AbortJob&) {
      throw;  // ends the job as it is
    } catch (const std::exception& e) {
      throw std::runtime_error(m.type() + "." + what + " failed: " + e.what());
    } catch (...) {
      throw std::runtime_error(m.type() + "." + what + " failed: " + kNotStdException);
    }
  }

  // lifecycle, keeping the first error in `first` instead of throwing it
  template <class F>
  void guarded(Module& m, const char* what, F&& f, std::exception_ptr& first) {
    try {
      lifecycle(m, what, f);
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }

  // end_run, once, on every module whose begin_run of the current run succeeded, even when one of
  // them fails (guarded; nothing outside a run). A failing end_run at a run boundary was called
  // again at the end, and a failing begin_run sent end_run to the modules after it, which had not
  // begun the run.
  void end_run_all(std::exception_ptr& first) {
    const size_t n = begun_;
    in_run_ = false;
    begun_ = 0;
    for (size_t k = 0; k < n; ++k) {
      Module& m = *modules_[k];
      guarded(m, "end_run", [&] { m.end_run(exp_, run_); }, first);
    }
  }

  void read_loop() {
    Module& source = *modules_.front();
    ModuleCounters& sc = *st_.modules[0];
    bool more = true;
    const bool drains = source.drains_at_stop();
    while (more && !aborting_.load() && (drains || !stop_requested())) {
      size_t want = static_cast<size_t>(opt_.batch_size);
      if (opt_.max_events) {
        const uint64_t left = opt_.max_events - std::min<uint64_t>(opt_.max_events, received_);
        if (left == 0) break;
        want = std::min<size_t>(want, left);
      }
      EventBatch batch(0);
      const CallStart t0;
      lifecycle(source, "next_batch", [&] { more = source.next_batch(batch, want); });
      // a call that brought no event (a stream input's idle poll) is not a batch: its wait stays out of
      // the time-per-batch histogram, where ten 0.1 s polls a second of an idle worker made the p99
      record(sc, batch.size(), t0, /*is_batch=*/batch.size() > 0);
      // batch_size is a hint a source may overshoot (whole messages), max_events a limit: the
      // surplus would be processed beyond it, or dropped
      if (opt_.max_events && batch.size() > want)
        throw std::logic_error(source.type() + ".next_batch returned " + std::to_string(batch.size()) +
                               " events, at most " + std::to_string(want) + " were asked for (max_events " +
                               std::to_string(opt_.max_events) + ")");
      if (batch.size() == 0) continue;
      received_ += batch.size();
      st_.received += batch.size();
      for (auto& segment : split_runs(batch)) dispatch(std::move(segment));
    }
  }

  // Splits a batch where (exp, run) changes. Rejected events (run unknown) belong to the run in
  // progress when they come, whatever the batch boundaries: those at the start of a batch to the
  // run of the batch before, those before the first run to the first run.
  std::vector<EventBatch> split_runs(EventBatch& batch) {
    std::vector<EventBatch> out;
    std::vector<size_t> idx;
    bool have_key = in_run_;
    uint64_t kexp = exp_, krun = run_;
    auto flush = [&] {
      if (!idx.empty()) out.push_back(idx.size() == batch.size() ? std::move(batch) : batch.select(idx));
      idx.clear();
    };
    for (size_t i = 0; i < batch.size(); ++i) {
      if (!batch.is_rejected(i)) {
        if (have_key && (batch.exp()[i] != kexp || batch.run()[i] != krun)) flush();
        have_key = true;
        kexp = batch.exp()[i];
        krun = batch.run()[i];
      }
      idx.push_back(i);
    }
    flush();
    return out;
  }

  void dispatch(EventBatch&& batch) {
    // Run boundary: finish what is in flight, then end_run / begin_run everywhere.
    for (size_t i = 0; i < batch.size(); ++i) {
      if (batch.is_rejected(i)) continue;
      const uint64_t e = batch.exp()[i], r = batch.run()[i];
      if (!in_run_ || e != exp_ || r != run_) {
        drain();
        std::exception_ptr err;
        end_run_all(err);
        if (err) std::rethrow_exception(err);
        exp_ = e;
        run_ = r;
        in_run_ = true;
        begun_ = 0;
        for (auto& m : modules_) {
          lifecycle(*m, "begin_run", [&] { m->begin_run(exp_, run_); });
          ++begun_;
        }
      }
      break;
    }
    batch.sequence = next_sequence_++;
    if (workers_.empty()) {
      run_modules(batch, 1, modules_.size());
      finish(batch);
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    // Bounded: the reader waits when the workers are busy (backpressure on the source).
    queue_cv_.wait(lock, [&] { return queue_.size() < 2 * workers_.size(); });
    queue_.push_back(std::move(batch));
    ++dispatched_;
    st_.batches_in_flight = dispatched_ - completed_;
    queue_cv_.notify_all();
  }

  void worker_loop() {
    for (;;) {
      EventBatch batch(0);
      {
        std::unique_lock<std::mutex> lock(mu_);
        queue_cv_.wait(lock, [&] { return closing_ || !queue_.empty(); });
        if (queue_.empty()) return;
        batch = std::move(queue_.front());
        queue_.pop_front();
      }
      queue_cv_.notify_all();
      run_modules(batch, 1, first_ordered_);
      {
        std::unique_lock<std::mutex> lock(order_mu_);
        order_cv_.wait(lock, [&] { return next_ordered_ == batch.sequence; });
      }
      run_modules(batch, first_ordered_, modules_.size());
      finish(batch);
      {
        std::lock_guard<std::mutex> lock(order_mu_);
        ++next_ordered_;
      }
      order_cv_.notify_all();
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++completed_;
        st_.batches_in_flight = dispatched_ - completed_;
      }
      done_cv_.notify_all();
    }
  }

  void drain() {
    if (workers_.empty()) return;
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return completed_ == dispatched_; });
  }

  void run_modules(EventBatch& batch, size_t from, size_t to) {
    for (size_t k = from; k < to; ++k) {
      const CallStart t0;
      call_event(*modules_[k], batch, k > first_writer_ ? modules_[first_writer_].get() : nullptr);
      record(*st_.modules[k], batch.size(), t0);
    }
  }

  // A module that raises on a batch is re-run event by event, so that only the events that
  // make it fail get the error flag and the others are processed normally.
  // The re-run starts from the batch as it was before the call (a snapshot sharing the column
  // buffers: copy-on-write, so it costs what the module writes), not as the module left it:
  // what it wrote before raising would otherwise be applied twice to the innocent events.
  // A module that ends the job (AbortJob) flags the events of its call, and those it was not
  // called on yet in the re-run.
  // Returns the AbortJob's message when the module ended the job, "" otherwise.
  // writer: the first output before m in the path (nullptr: none), after which m may not reject.
  std::string call_event(Module& m, EventBatch& batch, const Module* writer) {
    const EventBatch before = batch;
    try {
      m.event(batch);
      if (writer && batch.rejections().size() != before.rejections().size())
        rejections_after_output(m, *writer, batch, before);
      return {};
    } catch (const AbortJob& a) {
      abort_job(m, a);
      batch = before;
      for (size_t i = 0; i < batch.size(); ++i) flag(batch, i, m, a.what(), false);
      return a.what();
    } catch (const std::exception& e) {
      batch = before;
      if (batch.size() == 1) {
        flag(batch, 0, m, e.what());
        return {};
      }
    } catch (...) {  // a C++ module's `throw 42`: an error of its events too (it left the thread: abort)
      batch = before;
      if (batch.size() == 1) {
        flag(batch, 0, m, kNotStdException);
        return {};
      }
    }
    std::vector<EventBatch> parts;
    parts.reserve(batch.size());
    std::string aborted;  // from the event that ended the job on, each event gets its message
    for (size_t i = 0; i < batch.size(); ++i) {
      EventBatch one = batch.select({i});
      if (aborted.empty())
        aborted = call_event(m, one, writer);
      else
        flag(one, 0, m, aborted.c_str(), false);
      parts.push_back(std::move(one));
    }
    try {
      batch = EventBatch::concat(parts);
    } catch (const std::invalid_argument& e) {
      // The module wrote a column in one dtype for some events and in another for the others (or the
      // failed events kept theirs from before the call): the events cannot be joined again. Each event
      // of the batch, as it was before the call (batch still is), gets an error that says so; the run
      // goes on (the exception escaped: it ended the job, and with threads > 1 aborted the process).
      for (size_t i = 0; i < batch.size(); ++i)
        record_error(m, batch, i, m.type() + " raised on a batch with " + event_id(batch, i) + "; re-run event by " +
                                   "event, its events cannot be joined again: " + e.what() + " (a module writes a " +
                                   "column in one dtype whatever the event: np.asarray(values, dtype=...))");
    }
    batch.sequence = before.sequence;
    return aborted;
  }

  // An output before m has written the event (or, the quarantine, has passed it by): a rejection
  // now would count it as rejected while it is in the output file, or keep it in neither file.
  // So the event stays processed, and the rejection is counted and kept as a module error.
  void rejections_after_output(Module& m, const Module& writer, EventBatch& batch, const EventBatch& before) {
    std::vector<size_t> late;
    for (const auto& [i, r] : batch.rejections())
      if (!before.rejections().count(i)) late.push_back(i);
    for (size_t i : late) {
      const Rejection r = batch.withdraw_rejection(i);
      record_error(m, batch, i, m.type() + " rejected " + event_id(batch, i) + " (" + r.reason +
                                 (r.detail.empty() ? "" : ": " + r.detail) + ") after the output " + writer.type() +
                                 ": a module after an output cannot reject; the event stays, with this error");
    }
  }

  // The first AbortJob is kept for execute(); the source is read no more.
  void abort_job(Module& m, const AbortJob& a) {
    std::lock_guard<std::mutex> lock(abort_mu_);
    if (abort_) return;
    abort_ = std::current_exception();
    aborting_.store(true);
    std::fprintf(stderr, "[ERROR] %s: %s; the batches in flight finish, then the run ends\n", m.type().c_str(), a.what());
  }

  void flag(EventBatch& b, size_t i, Module& m, const char* what, bool print = true) {
    record_error(m, b, i, m.type() + " raised on " + event_id(b, i) + ": " + what, print);
  }

  void record_error(const Module& m, EventBatch& b, size_t i, const std::string& msg, bool print = true) {
    b.flag_error(i, msg);
    st_.record_error(msg);
    for (size_t k = 0; k < modules_.size(); ++k)  // an instance is in a path once (Path.add_module)
      if (modules_[k].get() == &m) st_.modules[k]->errors.fetch_add(1, std::memory_order_relaxed);
    if (!print) return;
    // A misconfigured module fails on every event: the log shows the first ones, not one line per
    // event at 30 kHz (each error is still counted, and its message stays with its event).
    const uint64_t k = errors_printed_.fetch_add(1, std::memory_order_relaxed);
    if (k < kErrorsPrinted)
      std::fprintf(stderr, "[ERROR] %s\n", msg.c_str());
    else if (k == kErrorsPrinted)
      std::fprintf(stderr, "[ERROR] further module errors of this run are not printed; every one is counted "
                           "(statistics: errors, eclreco_events_module_errors_total) and flags its event\n");
  }

  void record(ModuleCounters& c, size_t events, const CallStart& t0, bool is_batch = true) {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t0.wall)
                        .count();
    c.calls.fetch_add(1, std::memory_order_relaxed);
    c.events.fetch_add(events, std::memory_order_relaxed);
    c.nanoseconds.fetch_add(static_cast<uint64_t>(ns), std::memory_order_relaxed);
    c.cpu_nanoseconds.fetch_add(thread_cpu_ns() - t0.cpu, std::memory_order_relaxed);
    if (!is_batch) return;
    size_t b = 0;
    const double s = ns * 1e-9;
    while (b < kBatchSecondsBuckets.size() && s > kBatchSecondsBuckets[b]) ++b;
    c.batch_seconds_hist[b].fetch_add(1, std::memory_order_relaxed);
  }

  void finish(const EventBatch& batch) {
    uint64_t rejected = 0, errors = 0;
    for (const auto& [i, r] : batch.rejections()) {
      ++rejected;
      st_.count_rejection(r.reason);
    }
    errors = batch.errors().size();
    st_.count_discards(batch.discards());
    st_.rejected += rejected;
    st_.processed += batch.size() - rejected;
    st_.errors += errors;
    st_.batches += 1;
    size_t b = 0;
    while (b < st_.events_per_batch_hist.size() - 1 && batch.size() > (size_t(1) << b)) ++b;
    st_.events_per_batch_hist[b].fetch_add(1, std::memory_order_relaxed);
  }

  const std::vector<std::shared_ptr<Module>>& modules_;
  const ProcessOptions& opt_;
  ProcessState& st_;
  size_t first_ordered_ = 0;
  size_t first_writer_ = 0;  // the first output (writes_events), modules_.size() when none
  uint64_t received_ = 0, next_sequence_ = 0;
  bool in_run_ = false;
  size_t begun_ = 0;  // modules that got begin_run of the current run (in path order)
  uint64_t exp_ = 0, run_ = 0;

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable queue_cv_, done_cv_;
  std::deque<EventBatch> queue_;
  uint64_t dispatched_ = 0, completed_ = 0;
  bool closing_ = false;
  std::mutex order_mu_;
  std::condition_variable order_cv_;
  uint64_t next_ordered_ = 0;
  std::mutex abort_mu_;
  std::exception_ptr abort_;  // the first AbortJob from a module's event()
  std::atomic<bool> aborting_{false};
};

}  // namespace

void Processor::process(Path& path, const ProcessOptions& options) {
  options.validate();  // before anything of the previous run's state is replaced
  retain_freed_memory();  // the next batch reuses what this one frees (heap.hpp)
  // Complete before it is published: the metrics exporter reads state() from its own thread during the
  // run (it copied the pointer while process() replaced it, and iterated `modules` while it grew).
  auto st = std::make_shared<ProcessState>();
  std::map<std::string, int> seen;  // the same module type twice in a path: RootOutput, RootOutput#1
  for (auto& m : path.modules()) {
    st->modules.push_back(std::make_unique<ModuleCounters>());
    const int k = seen[m->type()]++;
    st->modules.back()->name = k ? m->type() + "#" + std::to_string(k) : m->type();
  }
  g_stop_signal = 0;  // a run without handlers was not stopped by the signal of the run before it
  SignalGuard guard(options.install_signal_handlers);
  clear_stop();
  st->running = true;
  const double t0 = now_seconds();
  st->start_time = t0;
  {
    std::lock_guard<std::mutex> lock(state_mu_);
    state_ = st;
  }
  struct Finally {
    ProcessState& st;
    double t0;
    ~Finally() {
      st.wall_seconds = now_seconds() - t0;
      st.running = false;
    }
  } finally{*st, t0};
  Run run(path, options, *st);
  run.execute();
}

std::string Processor::statistics_table() const {
  std::ostringstream os;
  const std::shared_ptr<ProcessState> state = this->state();
  const auto& st = *state;
  // Time: wall time in the module; CPU: the calling thread's CPU time in it (lower when the
  // thread waits, e.g. a source for input, or when other processes share the cores).
  os << std::left << std::setw(24) << "Module" << std::right << std::setw(10) << "Calls"
     << std::setw(12) << "Events" << std::setw(12) << "Time [s]" << std::setw(14) << "us/event"
     << std::setw(14) << "CPU us/event" << "\n"
     << std::string(86, '=') << "\n";
  uint64_t total_ns = 0, total_cpu = 0;
  for (const auto& m : st.modules) {
    const uint64_t ev = m->events, ns = m->nanoseconds, cpu = m->cpu_nanoseconds;
    total_ns += ns;
    total_cpu += cpu;
    os << std::left << std::setw(24) << m->name << std::right << std::setw(10) << m->calls.load()
       << std::setw(12) << ev << std::setw(12) << std::fixed << std::setprecision(3) << ns * 1e-9
       << std::setw(14) << std::setprecision(2) << (ev ? ns * 1e-3 / ev : 0.0) << std::setw(14)
       << (ev ? cpu * 1e-3 / ev : 0.0) << "\n";
  }
  const uint64_t ev = st.received;
  os << std::string(86, '-') << "\n"
     << std::left << std::setw(24) << "Total" << std::right << std::setw(10) << st.batches.load()
     << std::setw(12) << ev << std::setw(12) << std::fixed << std::setprecision(3) << total_ns * 1e-9
     << std::setw(14) << std::setprecision(2) << (ev ? total_ns * 1e-3 / ev : 0.0) << std::setw(14)
     << (ev ? total_cpu * 1e-3 / ev : 0.0) << "\n";
  return os.str();
}

}  // namespace fw
