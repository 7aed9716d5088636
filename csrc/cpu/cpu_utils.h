// Helpers of the CPU kernels: grain sizes for at::parallel_for, and multi-versioned hot loops.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rcl_ops {

// Small problems run inline on the calling thread: waking the pool costs more than the work.
constexpr int64_t kMinTaskWork = 1 << 16;  // element operations per task

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

}  // namespace rcl_ops

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC
// function multi-versioning), so one build is fast on any x86-64; elsewhere they are
// compiled once. Multi-versioned functions cannot be templates: wrap an always-inline
// template in one non-template function per dtype.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RCL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RCL_MULTIVERSION
#endif
#define RCL_INLINE inline __attribute__((always_inline))
