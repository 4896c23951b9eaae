// EventInfoSetter: a source of empty events with consecutive event numbers (basf2's module of
// the same name), for framework tests and overhead benchmarks.
#include "framework/registry.hpp"

namespace {

class EventInfoSetter : public fw::Module {
 public:
  EventInfoSetter() {
    params().add("events", &events_, int64_t{1000}, "number of events to generate");
    params().add("exp", &exp_, int64_t{0}, "experiment number");
    params().add("run", &run_, int64_t{1}, "run number");
    params().add("detector", &detector_, std::string("belle2-ecl"), "detector configuration of the events");
  }
  bool is_source() const override { return true; }
  Collections makes() const override { return Names{}; }  // empty events: metadata only
  Collections needs() const override { return Names{}; }
  void initialize() override {
    if (detector_ != "belle2-ecl" && detector_ != "array30")
      throw fw::ParameterError("EventInfoSetter: detector must be belle2-ecl or array30");
    if (events_ < 0) throw fw::ParameterError("EventInfoSetter: events must be >= 0");
    if (events_ > (int64_t{1} << 32)) throw fw::ParameterError("EventInfoSetter: events must be <= 2^32 (evt is 32 bits)");
    // exp and run are 64-bit unsigned in the batch; an int parameter reaches 2^63-1
    for (auto [name, v] : {std::pair{"exp", exp_}, std::pair{"run", run_}})
      if (v < 0) throw fw::ParameterError(std::string("EventInfoSetter: ") + name + " must be >= 0");
    next_ = 0;
  }
  bool next_batch(fw::EventBatch& batch, size_t max_events) override {
    const uint64_t n = std::min<uint64_t>(max_events, static_cast<uint64_t>(events_) - next_);
    batch.resize(n);
    const uint8_t det = detector_ == "array30" ? 1 : 0;
    for (uint64_t i = 0; i < n; ++i) {
      batch.exp()[i] = static_cast<uint64_t>(exp_);
      batch.run()[i] = static_cast<uint64_t>(run_);
      batch.evt()[i] = static_cast<uint32_t>(next_ + i);
      batch.detector()[i] = det;
    }
    next_ += n;
    return next_ < static_cast<uint64_t>(events_);
  }

 private:
  int64_t events_ = 1000, exp_ = 0, run_ = 1;
  std::string detector_;
  uint64_t next_ = 0;
};

}  // namespace

ECLRECO_REGISTER_MODULE(EventInfoSetter, "EventInfoSetter", "generates empty events with consecutive event numbers")
