// Envelope of the ECL raw event wire format, version 1 (spec/wire-format.md): a MessagePack map
// {v, exp, run, evt, det, ecl, [time_ns], [crc32], [truth], ...unknown keys}. Pure functions on
// bytes (no framework types) so that a fuzz harness can call them directly.
//
// MessagePack is parsed with msgpack-cxx's SAX-style msgpack::parse and a visitor: no object
// tree is built, nothing is allocated per key, and a declared container or string size is never
// allocated before the bytes are there (a 5-byte "array of 4e9 elements" costs nothing).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace ecl {

// Bits of Envelope::known: which identifiers could be read (also from a rejected message).
enum EnvelopeKnown : uint8_t { kKnownExp = 1, kKnownRun = 2, kKnownEvt = 4, kKnownDet = 8 };

struct Envelope {
  // nullptr when the envelope is valid; else a static short code (a metrics label):
  //   empty_message  0 bytes
  //   not_msgpack    bytes that are not MessagePack (e.g. the never-used byte 0xc1)
  //   truncated      the MessagePack object ends after the bytes do
  //   trailing_bytes bytes after the first complete object (decode_envelope only)
  //   multi_frame    a multipart ZeroMQ message, marked by its receiver (kMultiFrameTag;
  //                  decode_envelope only)
  //   oversize       a message over its receiver's size limit, marked by the receiver
  //                  (kOversizeTag; decode_envelope only)
  //   (a message the receiver escaped with kVerbatimTag is decoded as sent: not_msgpack)
  //   not_a_map      the top-level object is not a map
  //   wrong_type     a key is not a string, or a known key holds the wrong type (nil included)
  //   duplicate_key  a known key appears twice
  //   missing_key    one of v, exp, run, evt, det, ecl is absent
  //   bad_version    v is an integer other than 1
  //   unknown_detector  det is a string other than "belle2-ecl" / "array30"
  //   out_of_range   exp/run/evt negative, evt >= 2^32, time_ns beyond int64, crc32 beyond uint32
  //   crc_mismatch   crc32 present and not the zlib CRC-32 of the ecl bytes
  const char* reason = nullptr;
  std::string detail;  // human-readable explanation (empty when valid)

  uint64_t exp = 0, run = 0;  // any MessagePack uint (the spec bounds only evt)
  uint32_t evt = 0;
  uint8_t known = 0;     // EnvelopeKnown bits
  uint8_t detector = 0;  // 0 belle2-ecl, 1 array30 (ecl::Detector)
  bool has_time = false;
  int64_t time_ns = 0;
  bool has_crc = false;
  uint32_t crc32 = 0;
  // Where the ECL payload (the `ecl` bin) lies, relative to the start of the message.
  size_t payload_offset = 0, payload_size = 0;
  // Where the bytes of the `run` and `evt` ints lie (set with kKnownRun, kKnownEvt): a replay that
  // renumbers events (the DAQ emulator's loop) rewrites exactly these.
  size_t run_offset = 0, run_size = 0;
  size_t evt_offset = 0, evt_size = 0;
  // Length of the first MessagePack object of the input (0 when it cannot be framed:
  // empty_message, not_msgpack, truncated).
  size_t message_size = 0;

  bool ok() const { return reason == nullptr; }
};

// The spec sends an event as one ZeroMQ message of a single frame. A receiver that gets a
// multipart message hands it on in band (also through the HLT distributor to a worker) as:
// this tag, the frame count n >= 2 and each frame's size (uint64 big-endian), the frames' bytes.
// 0xc1 starts no MessagePack object, so no envelope reads like this; decode_envelope rejects it
// as multi_frame and the marked bytes are what the quarantine keeps. Bytes that start with the
// tag but whose sizes do not account for every byte are what they look like (not_msgpack).
inline constexpr char kMultiFrameTag[] = "\xc1" "multi_frame";
inline constexpr size_t kMultiFrameTagSize = sizeof(kMultiFrameTag) - 1;
// A message over the receiver's size limit (max_message_bytes) is handed on the same way, whole:
// this tag, the limit (uint64 big-endian), the message's bytes. decode_envelope rejects it as
// oversize, with exp/run/evt/det read from the message where they can be. The receiver refusing
// it instead (ZMQ_MAXMSGSIZE) would drop the sender's connection and, with it, the valid events
// written behind it; the socket's own limit stays only as a far higher memory guard.
inline constexpr char kOversizeTag[] = "\xc1" "oversize";
inline constexpr size_t kOversizeTagSize = sizeof(kOversizeTag) - 1;
// The tag and the limit in front of the message's bytes.
inline constexpr size_t kOversizeHeadSize = kOversizeTagSize + 8;
// Bytes that start like such a mark with a message behind it (decode_envelope also checks the limit).
inline bool has_oversize_head(const uint8_t* data, size_t size) {
  return size > kOversizeHeadSize && std::memcmp(data, kOversizeTag, kOversizeTagSize) == 0;
}
// A single-frame message that itself starts with 0xc1 (the tags' first byte: no envelope does) is
// handed on behind this tag, so that a producer's bytes can never pass for a receiver's mark;
// decode_envelope reads the bytes after it as they were sent, without marks (not_msgpack).
inline constexpr char kVerbatimTag[] = "\xc1" "verbatim";
inline constexpr size_t kVerbatimTagSize = sizeof(kVerbatimTag) - 1;
// Bytes as the receiver escapes them: the tag, then the sent message, which starts with 0xc1.
inline bool is_verbatim(const uint8_t* data, size_t size) {
  return size > kVerbatimTagSize && data[kVerbatimTagSize] == 0xc1 &&
         std::memcmp(data, kVerbatimTag, kVerbatimTagSize) == 0;
}
// The start of the detail of such a message's rejection: the quarantine (RejectedOutput) keeps the
// bytes after the tag, i.e. exactly what the producer sent.
inline constexpr char kVerbatimDetail[] = "as sent (escaped by the receiver): ";

// Decodes one message that must be exactly one envelope (trailing bytes are an error).
Envelope decode_envelope(const uint8_t* data, size_t size);
// Decodes the first MessagePack object of a stream as an envelope; message_size tells where the
// next one starts (framing of raw files). Trailing bytes are the rest of the stream.
Envelope decode_envelope_prefix(const uint8_t* data, size_t size);
// Frames a whole stream with decode_envelope_prefix: appends the end offset of each message to
// `ends` (a message that is no valid envelope but a whole MessagePack object is framed too).
// Returns the position where framing stopped: size, or the start of bytes that cannot be framed,
// with `stop` the decoding of those bytes (its reason: not_msgpack or truncated).
size_t frame_stream(const uint8_t* data, size_t size, std::vector<int64_t>& ends, Envelope& stop);

// zlib's CRC-32 (reflected polynomial 0xEDB88320), same as zlib.crc32(data, crc) in Python.
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);

}  // namespace ecl
