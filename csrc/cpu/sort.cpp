// The CPU row sort (see sort.h).
#include "sort.h"

#include <numeric>

#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

// Keys: float_sort_key and its inverse float_from_sort_key (rcl_ops/math.h, shared with the
// CUDA radix sort). Signed zeros tie, as in torch.sort and the float64 comparison sort (a -0.0
// comes back from the keys as +0.0); every NaN sorts last, as in torch.sort.

// One counting-sort pass on the kBits-wide digit at `shift`. The first pass reads the keys
// from the input values (index = position); the last writes the sorted values and their
// source indices straight to the outputs, so no pass only copies.
template <int kBits, bool kFirst, bool kLast>
RCL_INLINE void radix_pass(const float* x, const uint32_t* src_keys, const order_t* src_index,
                           int64_t count, int shift, uint32_t* offset, uint32_t* dst_keys,
                           order_t* dst_index, float* sorted, order_t* order) {
  for (int64_t m = 0; m < count; ++m) {
    const uint32_t key = kFirst ? float_sort_key(x[m]) : src_keys[m];
    const order_t index = kFirst ? order_t(m) : src_index[m];
    const uint32_t pos = offset[(key >> shift) & ((1u << kBits) - 1)]++;
    if (kLast) {
      sorted[pos] = float_from_sort_key(key);
      order[pos] = index;
    } else {
      dst_keys[pos] = key;
      dst_index[pos] = index;
    }
  }
}

// Stable LSD radix sort of one row on the kBits-wide digits at `shifts` (least significant
// first), skipping digits that all values share.
template <int kBits, int kPasses>
void radix_sort_row(const float* x, int64_t count, const int (&shifts)[kPasses], float* sorted,
                    order_t* order, SortScratch& scratch) {
  constexpr int kBuckets = 1 << kBits;
  constexpr uint32_t kMask = kBuckets - 1;
  uint32_t histogram[kPasses][kBuckets] = {};
  for (int64_t m = 0; m < count; ++m) {
    const uint32_t key = float_sort_key(x[m]);
    for (int p = 0; p < kPasses; ++p) ++histogram[p][(key >> shifts[p]) & kMask];
  }
  const uint32_t first_key = float_sort_key(x[0]);
  int passes[kPasses], num_passes = 0;
  for (int p = 0; p < kPasses; ++p) {
    const uint32_t digit = (first_key >> shifts[p]) & kMask;
    if (histogram[p][digit] != uint32_t(count)) passes[num_passes++] = p;
  }
  // All digits shared: input order, the values read through their keys as the passes do.
  if (num_passes == 0) {
    for (int64_t m = 0; m < count; ++m) sorted[m] = float_from_sort_key(float_sort_key(x[m]));
    std::iota(order, order + count, order_t(0));
    return;
  }
  for (int b = 0; b < 2; ++b) {
    scratch.keys[b].resize(count);
    scratch.index[b].resize(count);
  }
  for (int n = 0; n < num_passes; ++n) {
    const int p = passes[n], src = n % 2, dst = 1 - src;
    uint32_t offset[kBuckets];
    uint32_t running = 0;
    for (int d = 0; d < kBuckets; ++d) {
      offset[d] = running;
      running += histogram[p][d];
    }
    const bool first = n == 0, last = n == num_passes - 1;
    const uint32_t* src_keys = scratch.keys[src].data();
    const order_t* src_index = scratch.index[src].data();
    uint32_t* dst_keys = scratch.keys[dst].data();
    order_t* dst_index = scratch.index[dst].data();
    if (first && last) {
      radix_pass<kBits, true, true>(x, src_keys, src_index, count, shifts[p], offset, dst_keys,
                                    dst_index, sorted, order);
    } else if (first) {
      radix_pass<kBits, true, false>(x, src_keys, src_index, count, shifts[p], offset, dst_keys,
                                     dst_index, sorted, order);
    } else if (last) {
      radix_pass<kBits, false, true>(x, src_keys, src_index, count, shifts[p], offset, dst_keys,
                                     dst_index, sorted, order);
    } else {
      radix_pass<kBits, false, false>(x, src_keys, src_index, count, shifts[p], offset, dst_keys,
                                      dst_index, sorted, order);
    }
  }
}

// Stable insertion sort of rows that are already nearly sorted; gives up (false) once it
// has moved values more than `budget` places in all.
bool finish_nearly_sorted(float* sorted, order_t* order, int64_t count, int64_t budget) {
  for (int64_t m = 1; m < count; ++m) {
    const float value = sorted[m];
    if (!(value < sorted[m - 1])) continue;
    const order_t index = order[m];
    int64_t j = m;
    for (; j > 0 && value < sorted[j - 1]; --j) {
      sorted[j] = sorted[j - 1];
      order[j] = order[j - 1];
    }
    sorted[j] = value;
    order[j] = index;
    budget -= m - j;
    if (budget < 0) return false;
  }
  return true;
}

// Sorts one row of float32, writing the sorted values and the source index of each; stable.
// Rows of up to kTwoPassMaxCount values: two radix passes on the top 24 bits of the keys
// (12-bit digits: faster than 11-bit ones, whose 22 bits leave four times as many values out
// of order) leave only values within a relative 2^-15 of each other out of order, which an
// insertion pass puts right; rows where it would move too much (values crowded into a tiny
// range) get the full three passes. Longer rows hold more such near-ties, so the insertion
// pass costs more than the third radix pass it saves: they get the three 11-bit passes
// directly. (The digit width and the threshold are measured:
// benchmarks/results/design-measurements.md.)
constexpr int64_t kTwoPassMaxCount = 24576;

// Rows of at most kInsertionMaxCount values: a stable insertion sort on the same keys (same
// order, ties and signed zeros as the radix passes), since zeroing and scanning the radix
// passes' 4096-bucket histograms costs more than the whole sort of a short row
// (benchmarks/results/design-measurements.md).
constexpr int64_t kInsertionMaxCount = 64;

void insertion_sort_row(const float* x, int64_t count, float* sorted, order_t* order) {
  uint32_t keys[kInsertionMaxCount];
  for (int64_t m = 0; m < count; ++m) {
    const uint32_t key = float_sort_key(x[m]);
    int64_t j = m;
    for (; j > 0 && key < keys[j - 1]; --j) {
      keys[j] = keys[j - 1];
      order[j] = order[j - 1];
    }
    keys[j] = key;
    order[j] = order_t(m);
  }
  for (int64_t m = 0; m < count; ++m) sorted[m] = float_from_sort_key(keys[m]);
}

}  // namespace

void sort_row(const float* x, int64_t count, float* sorted, order_t* order, SortScratch& scratch) {
  static constexpr int kTopBits[2] = {8, 20}, kAllBits[3] = {0, 11, 22};
  if (count <= kInsertionMaxCount) return insertion_sort_row(x, count, sorted, order);
  bool done = false;
  if (count <= kTwoPassMaxCount) {
    radix_sort_row<12>(x, count, kTopBits, sorted, order, scratch);
    done = finish_nearly_sorted(sorted, order, count, 4 * count);
  }
  if (!done) radix_sort_row<11>(x, count, kAllBits, sorted, order, scratch);
}

// float64 rows: a comparison sort of the indices.
void sort_row(const double* x, int64_t count, double* sorted, order_t* order,
              SortScratch& scratch) {
  std::vector<order_t>& index = scratch.order;
  index.resize(count);
  std::iota(index.begin(), index.end(), order_t(0));
  // Stable, so that ties keep their index order as in the float32 radix sort.
  std::stable_sort(index.begin(), index.end(), [x](order_t a, order_t b) { return x[a] < x[b]; });
  for (int64_t m = 0; m < count; ++m) {
    order[m] = index[m];
    sorted[m] = x[index[m]];
  }
}

}  // namespace rcl_ops
