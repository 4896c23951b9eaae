// ECLClusterizer: ECLDigits -> ECLClusters (connected regions, local maxima, energy sharing,
// positions, shower shapes, CNN images). The algorithm is documented in cpp/ecl/clustering.hpp.
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "ecl/clustering.hpp"
#include "framework/registry.hpp"

namespace {

class ECLClusterizer : public fw::Module {
 public:
  ECLClusterizer() {
    auto& p = params();
    p.add("input", &input_, std::string("ECLDigits"), "digit collection to cluster (cell, energy, time, quality)");
    p.add("output", &output_, std::string("ECLClusters"), "cluster collection to write");
    p.add("seed_energy_gev", &cp_.seed_energy_gev, 0.010, "seed threshold of a connected region, GeV (x sqrt(1+background_level))");
    p.add("growth_energy_gev", &cp_.growth_energy_gev, 0.0015, "threshold of a digit that makes a region grow, GeV (scaled)");
    p.add("digit_energy_gev", &cp_.digit_energy_gev, 0.0005, "threshold of a digit to join a region, GeV (scaled)");
    p.add("lm_energy_gev", &cp_.lm_energy_gev, 0.010, "threshold of a local maximum, GeV (scaled)");
    p.add("time_cut_ns", &cp_.time_cut_ns, 125.0, "seeds, growth digits and maxima need |time| < cut when their time is valid (quality 0); <= 0: no cut");
    p.add("background_level", &cp_.background_level, 0.0, "background noise variance in units of the electronics noise variance; energy thresholds are multiplied by sqrt(1 + background_level)");
    p.add("sharing_a", &cp_.sharing_a, 2.5, "a of the sharing weights exp(-a d / R_M) between local maxima");
    p.add("moliere_radius_cm", &cp_.moliere_radius_cm, 3.57, "R_M of the sharing weights, cm");
    p.add("log_weight_w0", &cp_.log_weight_w0, 4.0, "w0 of the logarithmic position weights max(0, w0 + ln(E_i/E))");
    p.add("convergence_cm", &cp_.convergence_cm, 0.01, "sharing iterations stop when no centroid moves more than this, cm");
    p.add("max_iterations", &cp_.max_iterations, 100, "maximum number of sharing iterations");
    p.add("position_crystals", &cp_.position_crystals, 9, "crystals of the cluster position (log weights): 9 the seed's 3 x 3, 21 its 5 x 5 without corners, 0 all the cluster's (the whole region: background digits pull a small cluster)");
    p.add("max_local_maxima", &cp_.max_local_maxima, 30, "per connected region: more local maxima than this keep "
                                                         "the highest (a noise burst over the detector made ~1000 "
                                                         "and took 10 s; physics events have <= 16)");
    p.add("lat_r0_cm", &cp_.lat_r0_cm, 5.0, "r0 of the lateral moment, cm");
    p.add("image_size", &cp_.image_size, 7, "N of the N x N cluster image around the seed (odd)");
  }

  Collections makes() const override { return Names{output_}; }
  Collections needs() const override { return Names{input_}; }

  void initialize() override {
    try {
      cp_.validate();
    } catch (const std::invalid_argument& e) {
      throw fw::ParameterError(std::string("ECLClusterizer: ") + e.what());
    }
    // An output over a collection another module makes (the unpacker's, the source's) is refused by the
    // processor's check of makes() (CollectionCheck), naming both modules; over its own input, here.
    if (output_.empty() || output_ == input_)
      throw fw::ParameterError("ECLClusterizer: output must be a collection name other than the input '" + input_ + "'");
    std::lock_guard<std::mutex> lock(mu_);
    pool_.clear();
  }

  void event(fw::EventBatch& batch) override {
    const size_t n = batch.size();
    if (!batch.has(input_)) {
      for (size_t i = 0; i < n; ++i)
        if (!batch.skips(i)) throw std::runtime_error("ECLClusterizer: no collection '" + input_ + "' in the batch");
      write(batch, nullptr);
      return;
    }
    std::unique_ptr<Scratch> s = acquire();
    const fw::Collection& digits = batch.get(input_);
    fw::require_columns(*this, digits, {"cell", "energy", "time", "quality"});
    s->skip.assign(n, 0);
    for (size_t i = 0; i < n; ++i) s->skip[i] = batch.skips(i) ? 1 : 0;
    s->clusterer.run(n, digits.offsets(), digits.column("cell").values<int32_t>(),
                     digits.column("energy").values<float>(), digits.column("time").values<float>(),
                     digits.column("quality").values<uint8_t>(), std::as_const(batch).detector(), s->skip.data(), s->out);
    write(batch, &s->out);
    clusters_ += s->out.size();
    invalid_digits_ += s->out.invalid_digits;
    release(std::move(s));
  }

  std::map<std::string, double> counters() const override {
    return {{"clusters", static_cast<double>(clusters_.load())},
            {"invalid_digits", static_cast<double>(invalid_digits_.load())}};
  }

 private:
  struct Scratch {
    explicit Scratch(const ecl::ClusterParams& p) : clusterer(p) {}
    ecl::Clusterer clusterer;
    ecl::ClusterOutput out;
    std::vector<uint8_t> skip;
  };
  std::unique_ptr<Scratch> acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!pool_.empty()) {
        auto s = std::move(pool_.back());
        pool_.pop_back();
        return s;
      }
    }
    return std::make_unique<Scratch>(cp_);
  }
  void release(std::unique_ptr<Scratch> s) {
    std::lock_guard<std::mutex> lock(mu_);
    pool_.push_back(std::move(s));
  }

  template <class T>
  static void fill(fw::Collection& c, const std::string& name, const std::vector<T>* v,
                   std::vector<int64_t> inner = {}) {
    fw::Column& col = c.add_column<T>(name, std::move(inner));
    if (v && !v->empty()) std::memcpy(col.data<T>(), v->data(), v->size() * sizeof(T));
  }

  void write(fw::EventBatch& batch, const ecl::ClusterOutput* o) {
    const size_t n = batch.size();
    std::vector<int64_t> counts(n, 0);
    if (o)
      for (size_t i = 0; i < n; ++i) counts[i] = o->offsets[i + 1] - o->offsets[i];
    fw::Collection& c = batch.add(output_);
    c.set_counts(counts);
    const int64_t N = cp_.image_size;
    for (const ecl::ClusterColumn& col : ecl::cluster_columns()) {
      if (col.f) fill(c, col.name, o ? &(o->*col.f) : nullptr);
      else fill(c, col.name, o ? &(o->*col.i) : nullptr);
    }
    fill(c, "image", o ? &o->image : nullptr, {N, N});
    fill(c, "features", o ? &o->features : nullptr, {int64_t{ecl::kNumFeatures}});
  }

  std::string input_, output_;
  ecl::ClusterParams cp_;
  std::mutex mu_;
  std::vector<std::unique_ptr<Scratch>> pool_;
  std::atomic<uint64_t> clusters_{0}, invalid_digits_{0};
};

}  // namespace

ECLRECO_REGISTER_MODULE(ECLClusterizer, "ECLClusterizer",
                        "clusters ECLDigits into ECLClusters: connected regions, local maxima, energy sharing, shapes, CNN images")
