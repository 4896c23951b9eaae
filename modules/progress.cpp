// Progress: prints the number of events and the event rate at a fixed interval (basf2's Progress).
#include <chrono>
#include <cstdio>

#include "framework/registry.hpp"

namespace {

class Progress : public fw::Module {
 public:
  Progress() {
    params().add("interval_s", &interval_s_, 5.0, "seconds between two progress lines");
    params().add("every", &every_, int64_t{0}, "also print every this many events (0: only by time)");
  }
  bool ordered() const override { return true; }  // counts events in input order
  Collections makes() const override { return Names{}; }
  Collections needs() const override { return Names{}; }
  void initialize() override {
    // a negative interval printed a line per batch; say so instead
    if (interval_s_ < 0) throw fw::ParameterError("Progress: interval_s must be >= 0 (0: a line per batch)");
    if (every_ < 0) throw fw::ParameterError("Progress: every must be >= 0 (0: only by time)");
    start_ = last_ = Clock::now();
    events_ = last_events_ = 0;
  }
  void event(fw::EventBatch& batch) override {
    const uint64_t before = events_;
    events_ += batch.size();
    const auto now = Clock::now();
    const double since = seconds(last_, now);
    const bool by_count = every_ > 0 && events_ / every_ != before / every_;
    if (since >= interval_s_ || by_count) {
      std::printf("[Progress] %llu events, %.0f events/s (%.0f events/s overall)\n",
                  static_cast<unsigned long long>(events_), (events_ - last_events_) / std::max(since, 1e-9),
                  events_ / std::max(seconds(start_, now), 1e-9));
      std::fflush(stdout);
      last_ = now;
      last_events_ = events_;
    }
  }
  void terminate() override {
    const double total = seconds(start_, Clock::now());
    std::printf("[Progress] done: %llu events in %.2f s\n", static_cast<unsigned long long>(events_), total);
    std::fflush(stdout);
  }

 private:
  using Clock = std::chrono::steady_clock;
  static double seconds(Clock::time_point a, Clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  }
  double interval_s_ = 5.0;
  int64_t every_ = 0;
  Clock::time_point start_, last_;
  uint64_t events_ = 0, last_events_ = 0;
};

}  // namespace

ECLRECO_REGISTER_MODULE(Progress, "Progress", "prints events processed and events/s at a fixed interval")
