// Earth mover's distance on CPU. Sketch: each residual's values sorted (LSD radix sort for
// float32, comparison sort for float64) and reduced to K mid-level quantiles, keeping the
// sort order for the scatter back. Pair: D[i, j] = mean_k |s_q[i, k] - s_k[j, k]|, tiled
// over (i, j) blocks and K chunks; the backward accumulates sign sums chunk by chunk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "cpu_utils.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

// ---- sort -------------------------------------------------------------------------------

// Monotone map float -> uint32: negatives to 2^32 - bits, the rest to bits | 2^31. -0.0 thus
// takes the key of +0.0: signed zeros tie and keep their index order, as in torch.sort and
// the float64 comparison sort (a -0.0 comes back from the keys as +0.0).
inline uint32_t float_to_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? 0u - u : (u | 0x80000000u);
}

inline float key_to_float(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : 0u - key;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

struct SortScratch {
  std::vector<uint32_t> keys[2];
  std::vector<order_t> index[2];
  std::vector<order_t> order;
};

// One counting-sort pass on the kBits-wide digit at `shift`. The first pass reads the keys
// from the input values (index = position); the last writes the sorted values and their
// source indices straight to the outputs, so no pass only copies.
template <int kBits, bool kFirst, bool kLast>
RCL_INLINE void radix_pass(const float* x, const uint32_t* src_keys, const order_t* src_index,
                           int64_t count, int shift, uint32_t* offset, uint32_t* dst_keys,
                           order_t* dst_index, float* sorted, order_t* order) {
  for (int64_t m = 0; m < count; ++m) {
    const uint32_t key = kFirst ? float_to_key(x[m]) : src_keys[m];
    const order_t index = kFirst ? order_t(m) : src_index[m];
    const uint32_t pos = offset[(key >> shift) & ((1u << kBits) - 1)]++;
    if (kLast) {
      sorted[pos] = key_to_float(key);
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
    const uint32_t key = float_to_key(x[m]);
    for (int p = 0; p < kPasses; ++p) ++histogram[p][(key >> shifts[p]) & kMask];
  }
  const uint32_t first_key = float_to_key(x[0]);
  int passes[kPasses], num_passes = 0;
  for (int p = 0; p < kPasses; ++p) {
    const uint32_t digit = (first_key >> shifts[p]) & kMask;
    if (histogram[p][digit] != uint32_t(count)) passes[num_passes++] = p;
  }
  if (num_passes == 0) {  // all digits shared
    std::copy(x, x + count, sorted);
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
// (12-bit digits: 10% faster than 11-bit ones at 12,288 values per row, whose 22 bits leave
// four times as many values out of order) leave only values within a relative 2^-15 of each
// other out of order, which an insertion pass puts right; rows where it would move too much
// (values crowded into a tiny range) get the full three passes. Longer rows hold more such
// near-ties, so the insertion pass costs more than the third radix pass it saves (measured:
// two passes 5-10% faster at 24,576 values per row, 20% slower at 49,152): they get the
// three 11-bit passes directly.
constexpr int64_t kTwoPassMaxCount = 24576;

// Rows of at most kInsertionMaxCount values: a stable insertion sort on the same keys (same
// order, ties and signed zeros as the radix passes), since zeroing and scanning the radix
// passes' 4096-bucket histograms costs more than the whole sort of a short row (8 rows of
// 16 values: 47 us by radix).
constexpr int64_t kInsertionMaxCount = 64;

void insertion_sort_row(const float* x, int64_t count, float* sorted, order_t* order) {
  uint32_t keys[kInsertionMaxCount];
  for (int64_t m = 0; m < count; ++m) {
    const uint32_t key = float_to_key(x[m]);
    int64_t j = m;
    for (; j > 0 && key < keys[j - 1]; --j) {
      keys[j] = keys[j - 1];
      order[j] = order[j - 1];
    }
    keys[j] = key;
    order[j] = order_t(m);
  }
  for (int64_t m = 0; m < count; ++m) sorted[m] = key_to_float(keys[m]);
}

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

// Rows to sort: x (rows, count) contiguous, into sorted and order of the same shape.
struct SortBatch {
  at::Tensor x, sorted, order;
};

SortBatch make_sort_batch(const at::Tensor& x_in, const char* op, const char* name) {
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

std::tuple<at::Tensor, at::Tensor> sorted_quantiles_cpu(const at::Tensor& x_in,
                                                        int64_t num_quantiles) {
  const char* op = "rcl_ops::sorted_quantiles";
  SortBatch batch = make_sort_batch(x_in, op, "x");
  TORCH_CHECK(num_quantiles >= 1, op, ": num_quantiles must be positive, got ", num_quantiles);
  const int64_t rows = batch.x.size(0), count = batch.x.size(1);
  if (num_quantiles == count) {
    sort_batches({&batch}, [](int64_t, const auto*) {});
    return {batch.sorted, batch.order};
  }
  std::vector<QuantilePosition> positions;
  for (int64_t k = 0; k < num_quantiles; ++k) {
    positions.push_back(quantile_position(k, num_quantiles, count));
  }
  at::Tensor quantiles = at::empty({rows, num_quantiles}, batch.x.options());
  sort_batches({&batch}, [&](int64_t i, const auto* row_sorted) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(row_sorted)>>;
    T* row_quantiles = quantiles.data_ptr<T>() + i * num_quantiles;
    for (int64_t k = 0; k < num_quantiles; ++k) {
      const QuantilePosition p = positions[k];
      row_quantiles[k] = T(double(row_sorted[p.lower]) * (1.0 - p.upper_weight) +
                           double(row_sorted[p.upper]) * p.upper_weight);
    }
  });
  return {quantiles, batch.order};
}

at::Tensor sorted_quantiles_backward_cpu(const at::Tensor& grad_in, const at::Tensor& order_in) {
  const char* op = "rcl_ops::sorted_quantiles_backward";
  check_rows(grad_in, op, "grad_quantiles");
  check_quantile_order(order_in, grad_in, op);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor order = order_in.contiguous();
  const int64_t rows = grad.size(0), num_quantiles = grad.size(1), count = order.size(1);
  at::Tensor grad_x = at::empty({rows, count}, grad.options());
  std::vector<QuantilePosition> positions;
  for (int64_t k = 0; num_quantiles != count && k < num_quantiles; ++k) {
    positions.push_back(quantile_position(k, num_quantiles, count));
  }
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rcl_ops::sorted_quantiles_backward", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const order_t* orderp = order.data_ptr<order_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> grad_sorted(num_quantiles == count ? 0 : count);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* g = gp + i * num_quantiles;
        if (num_quantiles != count) {
          std::fill(grad_sorted.begin(), grad_sorted.end(), scalar_t(0));
          for (int64_t k = 0; k < num_quantiles; ++k) {
            const QuantilePosition p = positions[k];
            grad_sorted[p.lower] += scalar_t(double(g[k]) * (1.0 - p.upper_weight));
            grad_sorted[p.upper] += scalar_t(double(g[k]) * p.upper_weight);
          }
          g = grad_sorted.data();
        }
        const order_t* row_order = orderp + i * count;
        scalar_t* row_grad = gx + i * count;
        for (int64_t m = 0; m < count; ++m) row_grad[row_order[m]] = g[m];
      }
    });
  });
  return grad_x;
}

// ---- pair ----------------------------------------------------------------------------------

constexpr int64_t kTile = 4;         // (i, j) block of the forward
constexpr int64_t kChunk = 1024;     // K values per float partial sum (then added in double)
constexpr int kRows = 8;             // q rows per backward register block
constexpr int kVector = 16;          // K values per backward register block
constexpr int64_t kGradChunk = 256;  // K values per backward task

// Adds one (kTile x kTile) block of D's sums over K values [c, end) to acc (row stride n).
// Per 64-byte vector of K values, the block's kTile q rows and kTile key rows are loaded
// once and all kTile^2 sums of |difference| accumulate in registers (AVX-512: 16
// accumulators; 1.5x faster than streaming each pair, as fast on AVX2), as float lanes
// within the chunk, then in double. Edge blocks repeat their last row (results unused).
struct Block {
  int64_t i0, j0, ni, nj;
};

template <typename T>
RCL_INLINE void emd_forward_block(const T* qp, const T* kp, int64_t n, const Block& block,
                                  int64_t c, int64_t end, double* acc) {
  constexpr int kVec = 64 / sizeof(T);
  const T* q_rows[kTile];
  const T* k_rows[kTile];
  for (int r = 0; r < kTile; ++r) {
    q_rows[r] = qp + (block.i0 + std::min<int64_t>(r, block.ni - 1)) * n;
    k_rows[r] = kp + (block.j0 + std::min<int64_t>(r, block.nj - 1)) * n;
  }
  T lanes[kTile][kTile][kVec] = {};
  int64_t k = c;
  for (; k + kVec <= end; k += kVec) {
    T a[kTile][kVec], b[kTile][kVec];
    for (int r = 0; r < kTile; ++r) {
      for (int l = 0; l < kVec; ++l) {
        a[r][l] = q_rows[r][k + l];
        b[r][l] = k_rows[r][k + l];
      }
    }
    for (int ii = 0; ii < kTile; ++ii) {
      for (int jj = 0; jj < kTile; ++jj) {
        for (int l = 0; l < kVec; ++l) lanes[ii][jj][l] += std::abs(a[ii][l] - b[jj][l]);
      }
    }
  }
  for (int ii = 0; ii < kTile; ++ii) {
    for (int jj = 0; jj < kTile; ++jj) {
      T total = 0;
      for (int l = 0; l < kVec; ++l) total += lanes[ii][jj][l];
      for (int64_t t = k; t < end; ++t) total += std::abs(q_rows[ii][t] - k_rows[jj][t]);
      acc[ii * kTile + jj] += total;
    }
  }
}

RCL_MULTIVERSION void emd_forward_block_f32(const float* qp, const float* kp, int64_t n,
                                            const Block& block, int64_t c, int64_t end,
                                            double* acc) {
  emd_forward_block(qp, kp, n, block, c, end, acc);
}

RCL_MULTIVERSION void emd_forward_block_f64(const double* qp, const double* kp, int64_t n,
                                            const Block& block, int64_t c, int64_t end,
                                            double* acc) {
  emd_forward_block(qp, kp, n, block, c, end, acc);
}

inline void emd_forward_block_any(const float* qp, const float* kp, int64_t n, const Block& block,
                                  int64_t c, int64_t end, double* acc) {
  emd_forward_block_f32(qp, kp, n, block, c, end, acc);
}

inline void emd_forward_block_any(const double* qp, const double* kp, int64_t n, const Block& block,
                                  int64_t c, int64_t end, double* acc) {
  emd_forward_block_f64(qp, kp, n, block, c, end, acc);
}

// Backward over K values [c, c + len) for all pairs: with g = grad / K,
// grad_q[i, k] = sum_j g[i, j] sign(q[i, k] - s_k[j, k]), grad_k[j, k] = -sum_i (same).
// A block of kRows q rows x kVector values stays in registers while j sweeps the keys, so
// each key value is loaded once per block; grad_k's chunk accumulates in key_buffer
// (bk x len, cache-resident). Gradients are written at sorted positions; the exact EMD's
// scatter back through the sort orders is a second, row-wise pass (permute_rows_in_place):
// scattering from inside this chunked loop would touch every row at random, out of cache.
struct BackwardArgs {
  int64_t bq, bk, n;
};

template <typename T>
RCL_INLINE void emd_backward_chunk(const T* qp, const T* kp, const T* gp, T* gq, T* gk,
                                   T* key_buffer, const BackwardArgs& args, int64_t c,
                                   int64_t len) {
  const int64_t bq = args.bq, bk = args.bk, n = args.n;
  std::fill(key_buffer, key_buffer + bk * len, T(0));
  for (int64_t i0 = 0; i0 < bq; i0 += kRows) {
    const int64_t ni = std::min<int64_t>(kRows, bq - i0);
    for (int64_t k0 = c; k0 < c + len; k0 += kVector) {
      if (ni == kRows && k0 + kVector <= c + len) {
        T a[kRows][kVector], acc[kRows][kVector] = {};
        for (int r = 0; r < kRows; ++r) {
          for (int l = 0; l < kVector; ++l) a[r][l] = qp[(i0 + r) * n + k0 + l];
        }
        for (int64_t j = 0; j < bk; ++j) {
          const T* b = kp + j * n + k0;
          T* gb = key_buffer + j * len + (k0 - c);
          T g[kRows];
          for (int r = 0; r < kRows; ++r) g[r] = gp[(i0 + r) * bk + j];
          for (int l = 0; l < kVector; ++l) {
            const T key = b[l];
            T key_sum = 0;
            for (int r = 0; r < kRows; ++r) {
              const T s = g[r] * sign_of_difference(a[r][l], key);
              acc[r][l] += s;
              key_sum += s;
            }
            gb[l] -= key_sum;
          }
        }
        for (int r = 0; r < kRows; ++r) {
          for (int l = 0; l < kVector; ++l) gq[(i0 + r) * n + k0 + l] = acc[r][l];
        }
      } else {  // ragged edge: plain loops
        const int64_t nv = std::min<int64_t>(kVector, c + len - k0);
        for (int64_t i = i0; i < i0 + ni; ++i) {
          for (int64_t k = k0; k < k0 + nv; ++k) {
            T total = 0;
            for (int64_t j = 0; j < bk; ++j) {
              const T s = gp[i * bk + j] * sign_of_difference(qp[i * n + k], kp[j * n + k]);
              total += s;
              key_buffer[j * len + (k - c)] -= s;
            }
            gq[i * n + k] = total;
          }
        }
      }
    }
  }
  for (int64_t j = 0; j < bk; ++j) {
    for (int64_t k = c; k < c + len; ++k) {
      gk[j * n + k] = key_buffer[j * len + (k - c)];
    }
  }
}

RCL_MULTIVERSION void emd_backward_chunk_f32(const float* qp, const float* kp, const float* gp,
                                             float* gq, float* gk, float* key_buffer,
                                             const BackwardArgs& args, int64_t c, int64_t len) {
  emd_backward_chunk(qp, kp, gp, gq, gk, key_buffer, args, c, len);
}

RCL_MULTIVERSION void emd_backward_chunk_f64(const double* qp, const double* kp, const double* gp,
                                             double* gq, double* gk, double* key_buffer,
                                             const BackwardArgs& args, int64_t c, int64_t len) {
  emd_backward_chunk(qp, kp, gp, gq, gk, key_buffer, args, c, len);
}

inline void emd_backward_chunk_any(const float* qp, const float* kp, const float* gp, float* gq,
                                   float* gk, float* key_buffer, const BackwardArgs& args,
                                   int64_t c, int64_t len) {
  emd_backward_chunk_f32(qp, kp, gp, gq, gk, key_buffer, args, c, len);
}

inline void emd_backward_chunk_any(const double* qp, const double* kp, const double* gp, double* gq,
                                   double* gk, double* key_buffer, const BackwardArgs& args,
                                   int64_t c, int64_t len) {
  emd_backward_chunk_f64(qp, kp, gp, gq, gk, key_buffer, args, c, len);
}

at::Tensor emd_pair_cpu(const at::Tensor& sq_in, const at::Tensor& sk_in) {
  check_pair(sq_in, sk_in, "rcl_ops::emd_pair");
  const at::Tensor sq = sq_in.contiguous(), sk = sk_in.contiguous();
  const int64_t bq = sq.size(0), bk = sk.size(0), n = sq.size(1);
  const int64_t tiles_q = (bq + kTile - 1) / kTile, tiles_k = (bk + kTile - 1) / kTile;
  at::Tensor out = at::empty({bq, bk}, sq.options());
  AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "rcl_ops::emd_pair", [&] {
    const scalar_t *qp = sq.data_ptr<scalar_t>(), *kp = sk.data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    // K chunks outermost: a thread's blocks then reuse the chunk of every row they read from
    // its core's L2 instead of streaming whole key rows from L3 once per block.
    at::parallel_for(
        0, tiles_q * tiles_k, grain_for(kTile * kTile * n), [&](int64_t begin, int64_t end) {
          std::vector<Block> blocks;
          for (int64_t tile = begin; tile < end; ++tile) {
            const int64_t i0 = (tile / tiles_k) * kTile, j0 = (tile % tiles_k) * kTile;
            blocks.push_back({i0, j0, std::min(kTile, bq - i0), std::min(kTile, bk - j0)});
          }
          std::vector<double> acc(blocks.size() * kTile * kTile, 0.0);
          for (int64_t c = 0; c < n; c += kChunk) {
            for (size_t b = 0; b < blocks.size(); ++b) {
              emd_forward_block_any(qp, kp, n, blocks[b], c, std::min(c + kChunk, n),
                                    acc.data() + b * kTile * kTile);
            }
          }
          for (size_t b = 0; b < blocks.size(); ++b) {
            const Block& block = blocks[b];
            for (int64_t ii = 0; ii < block.ni; ++ii) {
              for (int64_t jj = 0; jj < block.nj; ++jj) {
                outp[(block.i0 + ii) * bk + block.j0 + jj] =
                    scalar_t(acc[b * kTile * kTile + ii * kTile + jj] / n);
              }
            }
          }
        });
  });
  return out;
}

// Exact EMD forward: both batches sorted in one parallel region, then paired.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emd_exact_cpu(
    const at::Tensor& q, const at::Tensor& k) {
  const char* op = "rcl_ops::emd_exact";
  SortBatch sq = make_sort_batch(q, op, "q"), sk = make_sort_batch(k, op, "k");
  check_same_rows(q, k, op);
  sort_batches({&sq, &sk}, [](int64_t, const auto*) {});
  return {emd_pair_cpu(sq.sorted, sk.sorted), sq.sorted, sq.order, sk.sorted, sk.order};
}

// values[i, order[i, m]] = values[i, m] for each row, through a row-sized scratch: the
// scatter back from sorted positions, in place, one cache-resident row at a time.
template <typename T>
void permute_rows_in_place(at::Tensor& values, const at::Tensor& order) {
  const int64_t rows = values.size(0), count = values.size(1);
  T* vp = values.data_ptr<T>();
  const order_t* op = order.data_ptr<order_t>();
  at::parallel_for(0, rows, grain_for(count), [&](int64_t begin, int64_t end) {
    std::vector<T> row(count);
    for (int64_t i = begin; i < end; ++i) {
      T* values_row = vp + i * count;
      const order_t* order_row = op + i * count;
      std::copy(values_row, values_row + count, row.begin());
      for (int64_t m = 0; m < count; ++m) values_row[order_row[m]] = row[m];
    }
  });
}

// Shared by emd_pair_backward (sorted positions) and emd_exact_backward (scattered back
// through the orders when they are given).
std::tuple<at::Tensor, at::Tensor> run_emd_backward(const at::Tensor& grad_in, const at::Tensor& sq,
                                                    const at::Tensor& sk, const at::Tensor* order_q,
                                                    const at::Tensor* order_k, const char* op) {
  const int64_t bq = sq.size(0), bk = sk.size(0), n = sq.size(1);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == bq && grad_in.size(1) == bk, op,
              ": grad must have shape (", bq, ", ", bk, "), got ", grad_in.sizes());
  // dD[i, j]/ds_q[i, k] = sign(s_q[i, k] - s_k[j, k]) / K, and the negative for s_k.
  const at::Tensor grad = (grad_in.to(sq.scalar_type()) / double(n)).contiguous();
  at::Tensor grad_q = at::empty_like(sq), grad_k = at::empty_like(sk);
  const BackwardArgs args{bq, bk, n};
  AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "rcl_ops::emd_pair_backward", [&] {
    const scalar_t *qp = sq.data_ptr<scalar_t>(), *kp = sk.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t *gq = grad_q.data_ptr<scalar_t>(), *gk = grad_k.data_ptr<scalar_t>();
    const int64_t chunks = (n + kGradChunk - 1) / kGradChunk;
    // Chunks of K are independent for both outputs: no two threads write the same value.
    at::parallel_for(0, chunks, grain_for(bq * bk * kGradChunk), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> key_buffer(bk * kGradChunk);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t c = chunk * kGradChunk;
        emd_backward_chunk_any(qp, kp, gp, gq, gk, key_buffer.data(), args, c,
                               std::min(kGradChunk, n - c));
      }
    });
    if (order_q) permute_rows_in_place<scalar_t>(grad_q, *order_q);
    if (order_k) permute_rows_in_place<scalar_t>(grad_k, *order_k);
  });
  return {grad_q, grad_k};
}

std::tuple<at::Tensor, at::Tensor> emd_pair_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& sq_in,
                                                         const at::Tensor& sk_in) {
  const char* op = "rcl_ops::emd_pair_backward";
  check_pair(sq_in, sk_in, op);
  return run_emd_backward(grad, sq_in.contiguous(), sk_in.contiguous(), nullptr, nullptr, op);
}

std::tuple<at::Tensor, at::Tensor> emd_exact_backward_cpu(const at::Tensor& grad,
                                                          const at::Tensor& sq_in,
                                                          const at::Tensor& order_q_in,
                                                          const at::Tensor& sk_in,
                                                          const at::Tensor& order_k_in) {
  const char* op = "rcl_ops::emd_exact_backward";
  check_sorted_pair_and_orders(sq_in, order_q_in, sk_in, order_k_in, op);
  const at::Tensor order_q = order_q_in.contiguous(), order_k = order_k_in.contiguous();
  return run_emd_backward(grad, sq_in.contiguous(), sk_in.contiguous(), &order_q, &order_k, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(rcl_ops, CPU, m) {
  m.impl("sorted_quantiles", &sorted_quantiles_cpu);
  m.impl("sorted_quantiles_backward", &sorted_quantiles_backward_cpu);
  m.impl("emd_pair", &emd_pair_cpu);
  m.impl("emd_pair_backward", &emd_pair_backward_cpu);
  m.impl("emd_exact", &emd_exact_cpu);
  m.impl("emd_exact_backward", &emd_exact_backward_cpu);
}

}  // namespace rcl_ops
