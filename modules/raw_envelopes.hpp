// Forming batches from raw messages (spec/wire-format.md): shared by every source that reads
// raw events (RawFileInput, the Python sources through _core.append_envelopes).
//
// append_envelopes appends one event per message to a batch:
//  - collection "RawEnvelopes", column "bytes" (uint8): event i's message is
//    bytes[offsets[i]:offsets[i+1]] (kept for every event, also rejected ones: quarantine);
//  - collection "RawPayloadRef", one row per event, columns "offset" and "size" (int64: where
//    the ecl payload lies inside the event's message; size 0 for rejected events) and "known"
//    (uint8, ecl::EnvelopeKnown bits: which of exp/run/evt/det could be read);
//  - the metadata exp, run, evt, time_ns (0 when absent), detector (0 belle2-ecl, 1 array30);
//  - a malformed envelope: batch.reject(i, reason, detail) (reasons in ecl/envelope.hpp), with
//    exp/run/evt kept where they could be read.
// Collections already in the batch get empty entries for the new events.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ecl/envelope.hpp"
#include "framework/event_batch.hpp"

namespace rawdata {

struct MessageRef {
  const uint8_t* data;
  size_t size;
};

void append_envelopes(fw::EventBatch& batch, const MessageRef* messages, size_t n);
inline void append_envelopes(fw::EventBatch& batch, const std::vector<MessageRef>& messages) {
  append_envelopes(batch, messages.data(), messages.size());
}
// The same with envelopes already decoded (by a source that framed a stream with
// ecl::decode_envelope_prefix); decoded[k] belongs to messages[k].
void append_decoded(fw::EventBatch& batch, const MessageRef* messages, const ecl::Envelope* decoded, size_t n);

}  // namespace rawdata
