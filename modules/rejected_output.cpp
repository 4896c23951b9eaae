// RejectedOutput: the quarantine of rejected events (`--rejected FILE.msgpack`). Every rejected
// event of each batch is appended to `filename` as a MessagePack map
//   {"reason": str, "detail": str, "message": bin (the original bytes, empty when the event has
//    no RawEnvelopes entry; a receiver's escape of a message that started with 0xc1, or its mark of
//    an oversize message, taken off),
//    "exp"/"run"/"evt": int (only those that could be read),
//    "seq": int (with `sequence_collection`: the HLT distributor's sequence id of the event)}
// back to back, in input order (ordered module). Events with module errors are not written:
// only rejected ones. The file is flushed after every batch that had rejections. A failed write
// (disk full, size limit) is fatal: the run is asked to stop and ends with the error, and the
// file keeps only the complete records written before (it is truncated back to them).
// With `when_needed` the file is made at the first rejected event (a default quarantine that a
// clean job leaves no trace of); a file of that name from an earlier job is removed at initialize.
// The sequence id is the HLT distributor's number of an event, which a redelivery keeps: an event
// redelivered after its worker died is rejected again by the worker that takes it, in that worker's
// file, and `eclreco quarantine` counts the records of one id once (a file cannot know what another
// process wrote).
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <utility>

#include <unistd.h>

#include <msgpack.hpp>

#include "framework/processor.hpp"

#include "ecl/envelope.hpp"
#include "framework/registry.hpp"

namespace {

class RejectedOutput : public fw::Module {
 public:
  RejectedOutput() {
    params().add_required("filename", &filename_, "quarantine file for rejected events (MessagePack maps back to back)");
    params().add("append", &append_, false, "append to the file (a process that runs several runs: the HLT "
                                            "worker) instead of replacing it");
    params().add("when_needed", &when_needed_, false, "create the file at the first rejected event, not at "
                                                      "initialize (a file of that name is removed there unless append)");
    params().add("sequence_collection", &sequence_collection_, std::string(),
                 "collection with a uint64 column `seq`, one row per event (the HLT worker's HLTSequence): each "
                 "record gets its event's `seq`, by which the records of a redelivered event are one ('': none)");
  }
  ~RejectedOutput() override { close(); }
  bool ordered() const override { return true; }
  bool writes_events() const override { return true; }
  Collections makes() const override { return Names{}; }
  Collections needs() const override { return Names{}; }  // the raw bytes where the batch has them

  void initialize() override {
    close();
    written_before_ = file_start_ = written_;  // `written` counts over the module's life (a Prometheus counter)
    good_bytes_ = 0;
    error_.clear();
    if (when_needed_) {
      // what an earlier job left under this name is not this job's quarantine
      if (!append_ && std::remove(filename_.c_str()) != 0 && errno != ENOENT)
        throw std::runtime_error("cannot remove the old quarantine file '" + filename_ + "': " + std::strerror(errno));
      return;
    }
    open();
  }

  void open() {
    f_ = std::fopen(filename_.c_str(), append_ ? "ab" : "wb");
    if (!f_) throw std::runtime_error("cannot open quarantine file '" + filename_ + "': " + std::strerror(errno));
    if (append_ && std::fseek(f_, 0, SEEK_END) == 0) good_bytes_ = static_cast<size_t>(std::ftell(f_));
  }

  void event(fw::EventBatch& batch) override {
    // After a failed write only the rejected events are refused (their records cannot be kept): in the
    // event-by-event re-run of the failing batch the others pass, and are no module errors.
    if (batch.rejections().empty()) return;
    if (!error_.empty()) throw std::runtime_error(error_);
    if (!f_) {
      try {
        open();
      } catch (const std::exception& e) {  // as a failed write: fatal, every rejected event refused
        error_ = e.what();
        fw::request_stop(/*output_failed=*/true);
        throw;
      }
    }
    const fw::Collection* raw = batch.has("RawEnvelopes") ? &batch.get("RawEnvelopes") : nullptr;
    const fw::Collection* ref = batch.has("RawPayloadRef") ? &batch.get("RawPayloadRef") : nullptr;
    const uint8_t* bytes = raw && raw->has("bytes") ? raw->column("bytes").data<uint8_t>() : nullptr;
    const uint8_t* known = ref && ref->has("known") ? ref->column("known").data<uint8_t>() : nullptr;
    // A batch without the ids still has its records written (without `seq`): the raw bytes come first.
    const fw::Collection* seqs = !sequence_collection_.empty() && batch.has(sequence_collection_) &&
                                         batch.get(sequence_collection_).has("seq")
                                     ? &batch.get(sequence_collection_)
                                     : nullptr;
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    for (const auto& [i, rej] : batch.rejections()) {
      uint8_t k = ecl::kKnownExp | ecl::kKnownRun | ecl::kKnownEvt;  // no envelope info: trust the metadata
      if (known && ref->offsets()[i + 1] > ref->offsets()[i]) k = known[ref->offsets()[i]];
      const int n_ids = !!(k & ecl::kKnownExp) + !!(k & ecl::kKnownRun) + !!(k & ecl::kKnownEvt);
      const bool has_seq = seqs && seqs->offsets()[i + 1] > seqs->offsets()[i];
      pk.pack_map(3 + n_ids + (has_seq ? 1 : 0));
      pk.pack(std::string("reason"));
      pk.pack(rej.reason);
      pk.pack(std::string("detail"));
      pk.pack(rej.detail);
      pk.pack(std::string("message"));
      if (bytes) {
        int64_t a = raw->offsets()[i];
        const int64_t b = raw->offsets()[i + 1];
        // A message its receiver escaped (kVerbatimTag) or marked as over its limit (kOversizeTag, the
        // limit is in the detail) is kept as the producer sent it; a multi_frame mark stays (it holds
        // the frame boundaries).
        if (rej.detail.rfind(ecl::kVerbatimDetail, 0) == 0 && ecl::is_verbatim(bytes + a, static_cast<size_t>(b - a)))
          a += ecl::kVerbatimTagSize;
        else if (rej.reason == "oversize" && ecl::has_oversize_head(bytes + a, static_cast<size_t>(b - a)))
          a += ecl::kOversizeHeadSize;
        pk.pack_bin(static_cast<uint32_t>(b - a));
        pk.pack_bin_body(reinterpret_cast<const char*>(bytes + a), static_cast<uint32_t>(b - a));
      } else {
        pk.pack_bin(0);
      }
      if (k & ecl::kKnownExp) {
        pk.pack(std::string("exp"));
        pk.pack(std::as_const(batch).exp()[i]);
      }
      if (k & ecl::kKnownRun) {
        pk.pack(std::string("run"));
        pk.pack(std::as_const(batch).run()[i]);
      }
      if (k & ecl::kKnownEvt) {
        pk.pack(std::string("evt"));
        pk.pack(std::as_const(batch).evt()[i]);
      }
      if (has_seq) {
        pk.pack(std::string("seq"));
        pk.pack(seqs->column("seq").values<uint64_t>()[seqs->offsets()[i]]);
      }
      written_.fetch_add(1, std::memory_order_relaxed);
    }
    if (std::fwrite(buf.data(), 1, buf.size(), f_) != buf.size() || std::fflush(f_) != 0) {
      const int err = errno;
      close();
      // Keep the complete records only: cut a partly written one off.
      if (std::FILE* f = std::fopen(filename_.c_str(), "r+b")) {
        (void)!ftruncate(fileno(f), static_cast<off_t>(good_bytes_));
        std::fclose(f);
      }
      error_ = "cannot write quarantine file '" + filename_ + "': " + std::strerror(err) +
               " (kept the " + std::to_string(written_before_ - file_start_) + " complete records before it)";
      written_ = written_before_;
      fw::request_stop(/*output_failed=*/true);
      throw std::runtime_error(error_);
    }
    good_bytes_ += buf.size();
    written_before_ = written_;
  }

  void terminate() override {
    close();
    if (!error_.empty()) throw std::runtime_error(error_);
  }

  std::map<std::string, double> counters() const override {
    return {{"written", static_cast<double>(written_.load(std::memory_order_relaxed))}};
  }

 private:
  void close() {
    if (f_) std::fclose(f_);
    f_ = nullptr;
  }
  std::string filename_;
  std::string sequence_collection_;
  bool append_ = false;
  bool when_needed_ = false;
  std::FILE* f_ = nullptr;
  // written_: read by counters() from the metrics exporter's thread while a worker thread writes
  std::atomic<uint64_t> written_{0};
  uint64_t written_before_ = 0, file_start_ = 0;  // file_start_: written_ at initialize
  uint64_t good_bytes_ = 0;
  std::string error_;
};

}  // namespace

ECLRECO_REGISTER_MODULE(RejectedOutput, "RejectedOutput",
                        "writes rejected events (reason, detail, original bytes) to a MessagePack quarantine file")
