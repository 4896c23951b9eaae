// ECLLeakageCorrection: the classical energy correction (cpp/ecl/leakage.hpp) of ECLClusters:
// energy = energy_raw / R(ln energy_raw, position), R from a table built from simulation.
#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>

#include "ecl/geometry.hpp"
#include "ecl/leakage.hpp"
#include "framework/registry.hpp"
#include "framework/sha256.hpp"

namespace {

// Directory of the shared object holding this code (site-packages/eclreco/ when installed).
std::string own_directory() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&own_directory), &info) == 0 || !info.dli_fname) return ".";
  std::string p = info.dli_fname;
  const auto slash = p.rfind('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

class ECLLeakageCorrection : public fw::Module {
 public:
  ECLLeakageCorrection() {
    params().add("table", &table_, std::string(),
                 "leakage table (.npz from eclreco.leakage.build_leakage_table); empty: the package's "
                 "data/leakage_<detector>.npz for each event's detector");
    params().add("collection", &collection_, std::string("ECLClusters"),
                 "cluster collection: reads energy_raw, ring, local_u, local_v, overwrites energy");
  }

  Collections makes() const override { return Names{}; }  // it overwrites energy of its collection
  Collections needs() const override { return Names{collection_}; }

  void initialize() override {
    for (auto& t : tables_) t = ecl::LeakageTable();
    table_files_.clear();
    if (!table_.empty()) {
      auto t = ecl::LeakageTable::load(table_);
      table_files_["table"] = fw::file_provenance(table_, t.sha256());
      tables_[t.detector_code() == 1 ? 1 : 0] = std::move(t);
      explicit_ = true;
    } else {
      explicit_ = false;
      const std::string dir = own_directory() + "/data/";
      for (int d = 0; d < 2; ++d) {
        const std::string path = dir + "leakage_" + ecl::detector_name(static_cast<ecl::Detector>(d)) + ".npz";
        if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
          std::fclose(f);
          tables_[d] = ecl::LeakageTable::load(path);
          table_files_[std::string("table_") + ecl::detector_name(static_cast<ecl::Detector>(d))] =
              fw::file_provenance(path, tables_[d].sha256());
        }
      }
    }
  }

  // The tables loaded, path and SHA-256 of the bytes loaded, for the output file's metadata: a table of its own
  // as `table`, else the package's as `table_<detector>` (the metadata's package_data hashes the files again
  // when it is made, once per process: a table replaced in between, a reinstall, was recorded wrongly).
  Provenance provenance() const override { return table_files_; }

  void event(fw::EventBatch& batch) override {
    if (!batch.has(collection_)) {
      for (size_t i = 0; i < batch.size(); ++i)
        if (!batch.skips(i)) throw std::runtime_error("ECLLeakageCorrection: no collection '" + collection_ + "'");
      return;
    }
    fw::Collection& c = batch.get(collection_);
    fw::require_columns(*this, c, {"energy_raw", "ring", "local_u", "local_v", "energy"});
    // read through const: a non-const access unshares (copies) a column the processor's snapshot holds
    const fw::Collection& in = c;
    const int64_t* off = in.offsets();
    // values<>: one value per row (a column of another shape, from a custom module, was read interleaved)
    const float* e_raw = in.column("energy_raw").values<float>();
    const int32_t* ring = in.column("ring").values<int32_t>();
    const float* u = in.column("local_u").values<float>();
    const float* v = in.column("local_v").values<float>();
    float* e = c.column("energy").values<float>();
    const uint8_t* det = std::as_const(batch).detector();
    uint64_t n = 0;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (off[i + 1] == off[i]) continue;
      const int d = det[i] == 1 ? 1 : 0;
      const ecl::LeakageTable& t = tables_[d];
      if (t.empty())
        throw std::runtime_error(std::string("ECLLeakageCorrection: no leakage table for detector ") +
                                 ecl::detector_name(static_cast<ecl::Detector>(d)) +
                                 (explicit_ ? " (the 'table' parameter holds another detector's table)" : ""));
      for (int64_t k = off[i]; k < off[i + 1]; ++k)
        e[k] = static_cast<float>(t.correct(e_raw[k], ring[k], u[k], v[k]));
      n += off[i + 1] - off[i];
    }
    corrected_ += n;
  }

  std::map<std::string, double> counters() const override {
    return {{"clusters_corrected", static_cast<double>(corrected_.load())}};
  }

 private:
  std::string table_, collection_;
  bool explicit_ = false;
  ecl::LeakageTable tables_[2];
  Provenance table_files_;  // provenance(): {path, sha256} of each table loaded
  std::atomic<uint64_t> corrected_{0};
};

}  // namespace

ECLRECO_REGISTER_MODULE(ECLLeakageCorrection, "ECLLeakageCorrection",
                        "classical leakage correction of ECLClusters.energy from a response table (ln E_raw x position)")
