// Grain sizes for at::parallel_for: small problems run inline on the calling thread, since
// waking the pool costs more than the work.
#pragma once

#include <algorithm>
#include <cstdint>

namespace rcl_ops {

constexpr int64_t kMinTaskWork = 1 << 16;  // element operations per task

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

}  // namespace rcl_ops
