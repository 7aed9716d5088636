// rcl_ops::pooled_std on CPU: two passes over each batch in fixed chunks (sums and range, then
// squared deviations from the batch mean), each added in chunk order, so the result does not
// depend on the number of threads.
#include "pooled_std.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

constexpr int64_t kChunk = int64_t(1) << 14;

struct ChunkSums {
  double sum, lo, hi, deviations;
};

template <typename T>
ValueMoments moments_of(const T* x, int64_t count) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  std::vector<ChunkSums> parts(static_cast<size_t>(chunks));
  const auto each_chunk = [&](auto&& body) {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        body(parts[size_t(c)], c * kChunk, std::min(count, (c + 1) * kChunk));
    });
  };
  each_chunk([&](ChunkSums& part, int64_t begin, int64_t end) {
    part = {0.0, INFINITY, -INFINITY, 0.0};
    for (int64_t s = begin; s < end; ++s) {
      const double v = double(x[s]);
      part.sum += v;
      part.lo = nan_min(part.lo, v);
      part.hi = nan_max(part.hi, v);
    }
  });
  ValueMoments m{double(count), 0.0, 0.0, INFINITY, -INFINITY};
  double total = 0.0;
  for (const ChunkSums& part : parts) {
    total += part.sum;
    m.lo = nan_min(m.lo, part.lo);
    m.hi = nan_max(m.hi, part.hi);
  }
  m.mean = total / m.count;
  each_chunk([&](ChunkSums& part, int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const double deviation = double(x[s]) - m.mean;
      part.deviations += deviation * deviation;
    }
  });
  for (const ChunkSums& part : parts) m.deviations += part.deviations;
  return m;
}

}  // namespace

at::Tensor pooled_std_cpu(const at::Tensor& q_in, const at::Tensor& k_in) {
  const char* op = "rcl_ops::pooled_std";
  check_rows(q_in, op, "q");
  check_rows(k_in, op, "k");
  check_same(q_in, k_in, op, "q", "k");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous();
  double std = 0.0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rcl_ops::pooled_std", [&] {
    std = pooled_std_of(moments_of(q.data_ptr<scalar_t>(), q.numel()),
                        moments_of(k.data_ptr<scalar_t>(), k.numel()));
  });
  return at::full({1}, std, q.options().dtype(at::kDouble));
}

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) { m.impl("pooled_std", &pooled_std_cpu); }

}  // namespace rcl_ops
