// Row sort of the CPU kernels: each row of values sorted, with the source index of every
// sorted value (the sort order), stably, so that ties keep their index order as torch.sort
// does. float32 rows use an LSD radix sort on monotone integer keys (an insertion sort for
// short rows), float64 rows a comparison sort. Tested on its own in tests/test_sort.py
// (through rcl_ops::sorted_quantiles with K = M, which is the sort and nothing else).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "cpu_utils.h"

namespace rcl_ops {

// Per-thread buffers, reused across the rows a thread sorts.
struct SortScratch {
  std::vector<uint32_t> keys[2];
  std::vector<order_t> index[2];
  std::vector<order_t> order;
};

// Sorts the count values at x into sorted and writes the source index of each into order.
void sort_row(const float* x, int64_t count, float* sorted, order_t* order, SortScratch& scratch);
void sort_row(const double* x, int64_t count, double* sorted, order_t* order, SortScratch& scratch);

// Rows to sort: x (rows, count) contiguous, into sorted and order of the same shape.
struct SortBatch {
  at::Tensor x, sorted, order;
};

inline SortBatch make_sort_batch(const at::Tensor& x_in, const char* op, const char* name) {
  check_rows(x_in, op, name);
  TORCH_CHECK(x_in.size(1) < (int64_t(1) << 31), op, ": at most 2^31 - 1 values per row of ", name,
              ", got ", x_in.size(1));
  at::Tensor x = x_in.contiguous();
  return {x, at::empty_like(x), at::empty(x.sizes(), x.options().dtype(kOrderType))};
}

// Sorts the rows of all batches (same dtype and row length) in one parallel region, then
// calls row_done(row, sorted_row) for each row of the first batch while it is in cache.
template <typename RowDone>
void sort_batches(std::initializer_list<SortBatch*> batches, RowDone row_done) {
  std::vector<SortBatch*> list(batches);
  std::vector<int64_t> first_row{0};
  for (const SortBatch* batch : list) first_row.push_back(first_row.back() + batch->x.size(0));
  const int64_t count = list[0]->x.size(1);
  AT_DISPATCH_FLOATING_TYPES(list[0]->x.scalar_type(), "rcl_ops::sort_rows", [&] {
    at::parallel_for(0, first_row.back(), grain_for(8 * count), [&](int64_t begin, int64_t end) {
      SortScratch scratch;
      for (int64_t row = begin; row < end; ++row) {
        const size_t b =
            std::upper_bound(first_row.begin(), first_row.end(), row) - first_row.begin() - 1;
        const int64_t offset = (row - first_row[b]) * count;
        scalar_t* row_sorted = list[b]->sorted.data_ptr<scalar_t>() + offset;
        sort_row(list[b]->x.data_ptr<scalar_t>() + offset, count, row_sorted,
                 list[b]->order.data_ptr<order_t>() + offset, scratch);
        if (b == 0) row_done(row, static_cast<const scalar_t*>(row_sorted));
      }
    });
  });
}

}  // namespace rcl_ops
