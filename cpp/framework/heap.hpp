// How the C allocator treats the memory the event loop frees between batches.
#pragma once
#include <cstddef>

namespace fw {

// A batch allocates and frees megabytes of columns. glibc's default returns freed memory at the
// top of its heap to the kernel once more than ~2x its (self-adjusting) mmap threshold is free,
// so in a streaming worker, whose batches vary in size and interleave with message buffers,
// the next batch faults the same pages back in, zero-filled by the kernel: 4-5 page faults
// per event, ~15 % of an HLT worker's CPU (docs/performance.md). This keeps up to
// `trim_threshold` bytes of freed heap for reuse and serves blocks below `mmap_threshold` from
// the heap. Process-wide and idempotent; false where the C library has no such setting or refuses
// a value; std::invalid_argument above INT_MAX bytes (mallopt takes an int).
// 16 MB covers the worker's batches (its page faults went from ~60,000/s to ~500/s); 64 MB did
// no better there and added ~90 MB to the peak RSS of `eclreco bench` (2 threads, batch 1024).
constexpr std::size_t kRetainedHeapBytes = std::size_t(16) << 20;
constexpr std::size_t kHeapMmapThresholdBytes = std::size_t(4) << 20;
bool retain_freed_memory(std::size_t trim_threshold = kRetainedHeapBytes,
                         std::size_t mmap_threshold = kHeapMmapThresholdBytes);

}  // namespace fw
