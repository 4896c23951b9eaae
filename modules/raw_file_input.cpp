// RawFileInput: reads a raw file (spec/wire-format.md: envelopes back to back as a MessagePack
// stream) and hands up to max_events events per batch. The file is memory-mapped (no per-event
// system calls); each message is framed and decoded in one msgpack::parse pass
// (ecl::decode_envelope_prefix), then batches are formed with rawdata::append_decoded.
//
// Garbage: a message that is MessagePack but not a valid envelope is rejected with its reason
// and reading goes on with the next message. Bytes that cannot be framed as a MessagePack
// object (invalid bytes: not_msgpack; an object cut by the end of the file: truncated) make the
// end of the readable stream: the rest of the file becomes one last rejected event with that
// reason (its first 1 MiB kept as the message for the quarantine, the detail telling the byte
// offset and how many bytes were left unread) and reading stops there: without framing there is
// no reliable way to find the next message.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "framework/registry.hpp"
#include "raw_envelopes.hpp"

namespace {

constexpr size_t kMaxGarbageKept = size_t(1) << 20;

class RawFileInput : public fw::Module {
 public:
  RawFileInput() {
    params().add_required("filename", &filename_, "raw file to read (.msgpack: envelopes back to back)");
  }
  ~RawFileInput() override { unmap(); }

  bool is_source() const override { return true; }

  void initialize() override {
    unmap();
    pos_ = 0;
    events_ = rejected_ = 0;
    // O_NONBLOCK: open() of a FIFO would block until a writer comes (the fstat below refuses it)
    const int fd = ::open(filename_.c_str(), O_RDONLY | O_NONBLOCK);
    if (fd < 0) throw std::runtime_error("cannot open raw file '" + filename_ + "': " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw std::runtime_error("raw file '" + filename_ + "' is not a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        throw std::runtime_error("cannot map raw file '" + filename_ + "': " + std::strerror(err));
      }
      ::madvise(p, size_, MADV_SEQUENTIAL);
      data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);
  }

  bool next_batch(fw::EventBatch& batch, size_t max_events) override {
    msgs_.clear();
    envs_.clear();
    while (msgs_.size() < max_events && pos_ < size_) {
      ecl::Envelope e = ecl::decode_envelope_prefix(data_ + pos_, size_ - pos_);
      if (e.message_size == 0) {
        const size_t rest = size_ - pos_;
        const size_t keep = std::min(rest, kMaxGarbageKept);
        e.detail = "raw file '" + filename_ + "': no MessagePack object can be framed at byte " + std::to_string(pos_) +
                   " (" + e.detail + "); reading stopped, " + std::to_string(rest) + " byte(s) left unread" +
                   (keep < rest ? " (the first " + std::to_string(keep) + " kept)" : "");
        msgs_.push_back({data_ + pos_, keep});
        envs_.push_back(std::move(e));
        pos_ = size_;
        break;
      }
      msgs_.push_back({data_ + pos_, e.message_size});
      pos_ += e.message_size;
      envs_.push_back(std::move(e));
    }
    for (const auto& e : envs_) rejected_ += !e.ok();
    events_ += msgs_.size();
    rawdata::append_decoded(batch, msgs_.data(), envs_.data(), msgs_.size());
    return pos_ < size_;
  }

  void terminate() override { unmap(); }

  std::map<std::string, double> counters() const override {
    return {{"events", static_cast<double>(events_)}, {"rejected", static_cast<double>(rejected_)},
            {"bytes_read", static_cast<double>(pos_)}};
  }

 private:
  void unmap() {
    if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  std::string filename_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0, pos_ = 0;
  uint64_t events_ = 0, rejected_ = 0;
  std::vector<rawdata::MessageRef> msgs_;
  std::vector<ecl::Envelope> envs_;
};

}  // namespace

ECLRECO_REGISTER_MODULE(RawFileInput, "RawFileInput",
                        "reads a raw file of MessagePack envelopes (docs/wire-format.md) into batches")
