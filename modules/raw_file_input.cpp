// RawFileInput: reads a raw file (spec/wire-format.md: envelopes back to back as a MessagePack
// stream) and hands up to max_events events per batch. The file is read with pread() into a window
// that holds the batch being framed plus at least kWindow bytes ahead (a few system calls per batch);
// each message is framed and decoded in one msgpack::parse pass (ecl::decode_envelope_prefix), then
// batches are formed with rawdata::append_decoded, which copies the bytes. It was memory-mapped: a
// file cut short while being read (rewritten in place, truncated) then raised SIGBUS at the first
// page past its new end and killed the job without a word. Now a read that ends before the size the
// file had when opened is an error naming the file and both sizes; the events before it go on.
//
// Garbage: a message that is MessagePack but not a valid envelope is rejected with its reason
// and reading goes on with the next message. Bytes that cannot be framed as a MessagePack
// object (invalid bytes: not_msgpack; an object cut by the end of the file: truncated) make the
// end of the readable stream: the rest of the file becomes one last rejected event with that
// reason (its first 1 MiB kept as the message for the quarantine, the detail telling the byte
// offset and how many bytes were left unread) and reading stops there: without framing there is
// no reliable way to find the next message.
//
// provenance(): the file's identity as opened (fw::large_file_identity: path, size, mtime and the SHA-256 of its
// first and last 64 KiB), read at initialize from the descriptor it reads: two raw files of one name are told
// apart in the output's metadata. Not the whole file's digest: that would read the file twice (+3 s per GB).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "framework/registry.hpp"
#include "framework/sha256.hpp"
#include "raw_envelopes.hpp"

namespace {

constexpr size_t kMaxGarbageKept = size_t(1) << 20;
constexpr size_t kWindow = size_t(1) << 20;  // bytes read ahead of the framing, at least
// the most bytes read to frame one message: a corrupt length (a bin declaring 4 GB) in a large file
// must not read the rest of the file into memory (the farm refuses messages above 64 MiB anyway)
constexpr size_t kMaxFrame = size_t(256) << 20;

class RawFileInput : public fw::Module {
 public:
  RawFileInput() {
    params().add_required("filename", &filename_, "raw file to read (.msgpack: envelopes back to back)");
  }
  ~RawFileInput() override { close_file(); }

  bool is_source() const override { return true; }
  Collections makes() const override { return Names{"RawEnvelopes", "RawPayloadRef"}; }  // rawdata::append_decoded
  Collections needs() const override { return Names{}; }

  void initialize() override {
    close_file();
    identity_.clear();
    pos_ = 0;
    events_ = rejected_ = bytes_read_ = 0;
    // O_NONBLOCK: open() of a FIFO would block until a writer comes (the fstat below refuses it)
    const int fd = ::open(filename_.c_str(), O_RDONLY | O_NONBLOCK);
    if (fd < 0) throw std::runtime_error("cannot open raw file '" + filename_ + "': " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw std::runtime_error("raw file '" + filename_ + "' is not a regular file");
    }
    try {
      identity_ = fw::large_file_identity(filename_, fd, st);
    } catch (const std::exception& e) {
      ::close(fd);
      throw std::runtime_error(std::string("raw file: ") + e.what());
    }
    fd_ = fd;
    size_ = static_cast<size_t>(st.st_size);
    ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
  }

  bool next_batch(fw::EventBatch& batch, size_t max_events) override {
    msgs_.clear();
    envs_.clear();
    starts_.clear();
    while (msgs_.size() < max_events && pos_ < size_) {
      if (buffered_end() - pos_ < kWindow / 2 && buffered_end() < size_) fill(kWindow);
      ecl::Envelope e = ecl::decode_envelope_prefix(at(pos_), buffered_end() - pos_);
      // an object cut by the end of the window, not of the file: read on (the window grows) and frame again
      while (e.message_size == 0 && buffered_end() < size_ && buffered_end() - pos_ < kMaxFrame && e.reason &&
             std::strcmp(e.reason, "truncated") == 0) {
        fill(std::min(kMaxFrame, 2 * (buffered_end() - pos_)));
        e = ecl::decode_envelope_prefix(at(pos_), buffered_end() - pos_);
      }
      if (e.message_size == 0) {
        const size_t rest = size_ - pos_;
        const size_t keep = std::min(rest, kMaxGarbageKept);
        if (buffered_end() - pos_ < keep) fill(keep);
        e.detail = "raw file '" + filename_ + "': no MessagePack object can be framed at byte " + std::to_string(pos_) +
                   " (" + e.detail +
                   (buffered_end() < size_ && std::strcmp(e.reason, "truncated") == 0 ? ", within the " + std::to_string(buffered_end() - pos_) + " bytes read" : "") +
                   "); reading stopped, " + std::to_string(rest) + " byte(s) left unread" +
                   (keep < rest ? " (the first " + std::to_string(keep) + " kept)" : "");
        starts_.push_back(pos_);
        msgs_.push_back({nullptr, keep});
        envs_.push_back(std::move(e));
        pos_ = size_;
        break;
      }
      starts_.push_back(pos_);
      msgs_.push_back({nullptr, e.message_size});
      pos_ += e.message_size;
      envs_.push_back(std::move(e));
    }
    // the window may have moved while the batch was framed: its messages are pointed to at the end
    for (size_t k = 0; k < msgs_.size(); ++k) msgs_[k].data = at(starts_[k]);
    uint64_t rejected = 0;
    for (const auto& e : envs_) rejected += !e.ok();
    rejected_.fetch_add(rejected, std::memory_order_relaxed);
    events_.fetch_add(msgs_.size(), std::memory_order_relaxed);
    bytes_read_.store(pos_, std::memory_order_relaxed);
    rawdata::append_decoded(batch, msgs_.data(), envs_.data(), msgs_.size());
    return pos_ < size_;
  }

  void terminate() override { close_file(); }

  // kept after terminate: RootOutput writes the metadata after the path's modules before it have terminated
  Provenance provenance() const override {
    if (identity_.empty()) return {};
    return {{"input", identity_}};
  }

  std::map<std::string, double> counters() const override {
    return {{"events", static_cast<double>(events_.load(std::memory_order_relaxed))},
            {"rejected", static_cast<double>(rejected_.load(std::memory_order_relaxed))},
            {"bytes_read", static_cast<double>(bytes_read_.load(std::memory_order_relaxed))}};
  }

 private:
  size_t buffered_end() const { return buf_start_ + buf_len_; }
  const uint8_t* at(size_t file_offset) const { return buf_.data() + (file_offset - buf_start_); }

  // Reads on until the window holds at least `ahead` bytes from pos_ (or the file's end), keeping the
  // bytes of the batch being framed (from its first message) and dropping those before them.
  void fill(size_t ahead) {
    const size_t keep_from = starts_.empty() ? pos_ : starts_.front();
    if (keep_from > buf_start_) {
      const size_t drop = keep_from - buf_start_;
      std::memmove(buf_.data(), buf_.data() + drop, buf_len_ - drop);
      buf_len_ -= drop;
      buf_start_ = keep_from;
    }
    const size_t want = std::min(size_, pos_ + std::max(ahead, kWindow)) - buf_start_;
    if (buf_.size() < want) buf_.resize(want);
    while (buf_len_ < want) {
      const ssize_t r = ::pread(fd_, buf_.data() + buf_len_, want - buf_len_, static_cast<off_t>(buffered_end()));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0)
        throw std::runtime_error("cannot read raw file '" + filename_ + "' at byte " + std::to_string(buffered_end()) +
                                 ": " + std::strerror(errno));
      if (r == 0) {
        struct stat st {};
        const std::string now = ::fstat(fd_, &st) == 0 ? std::to_string(st.st_size) + " now" : "fewer now";
        throw std::runtime_error("raw file '" + filename_ + "' was cut short while being read: " +
                                 std::to_string(size_) + " bytes when opened, " + now + " (truncated or rewritten "
                                 "in place); the events from byte " + std::to_string(pos_) + " on are not in this job");
      }
      buf_len_ += static_cast<size_t>(r);
    }
  }

  void close_file() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    size_ = 0;
    buf_start_ = buf_len_ = 0;
    std::vector<uint8_t>().swap(buf_);
  }
  std::string filename_;
  std::map<std::string, std::string> identity_;  // provenance(): the file opened at initialize
  int fd_ = -1;
  std::vector<uint8_t> buf_;  // the file's bytes [buf_start_, buf_start_ + buf_len_)
  size_t buf_start_ = 0, buf_len_ = 0;
  size_t size_ = 0, pos_ = 0;
  // counters() reads these from the metrics exporter's thread while the processor's reader thread runs
  // next_batch: atomics, and pos_ (which next_batch moves all along) is published as bytes_read_
  std::atomic<uint64_t> events_{0}, rejected_{0}, bytes_read_{0};
  std::vector<rawdata::MessageRef> msgs_;
  std::vector<ecl::Envelope> envs_;
  std::vector<size_t> starts_;  // file offset of each message of the batch
};

}  // namespace

ECLRECO_REGISTER_MODULE(RawFileInput, "RawFileInput",
                        "reads a raw file of MessagePack envelopes (docs/wire-format.md) into batches")
