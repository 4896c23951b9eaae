#include "framework/heap.hpp"

#include <climits>
#include <stdexcept>
#include <string>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace fw {

bool retain_freed_memory(std::size_t trim_threshold, std::size_t mmap_threshold) {
  if (trim_threshold > INT_MAX || mmap_threshold > INT_MAX)
    throw std::invalid_argument("retain_freed_memory: thresholds are at most " + std::to_string(INT_MAX) + " bytes");
#if defined(__GLIBC__)
  // Setting either value also ends glibc's dynamic adjustment of both, which is what let the
  // thresholds sit low enough to trim every batch.
  const bool trim = mallopt(M_TRIM_THRESHOLD, static_cast<int>(trim_threshold)) == 1;
  const bool mmap = mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold)) == 1;
  return trim && mmap;
#else
  (void)trim_threshold;
  (void)mmap_threshold;
  return false;
#endif
}

}  // namespace fw
