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
#include "sort.h"

namespace rcl_ops {
namespace {

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
// accumulators; faster than streaming each pair, as fast on AVX2: see
// benchmarks/results/design-measurements.md), as float lanes
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
// through the orders when they are given). Both sides come out of one fused loop (the sign
// of each difference serves both), so a masked side saves only its scatter pass.
std::tuple<at::Tensor, at::Tensor> run_emd_backward(const at::Tensor& grad_in, const at::Tensor& sq,
                                                    const at::Tensor& sk, const at::Tensor* order_q,
                                                    const at::Tensor* order_k, OutputMask mask,
                                                    const char* op) {
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
    if (order_q && mask[0]) permute_rows_in_place<scalar_t>(grad_q, *order_q);
    if (order_k && mask[1]) permute_rows_in_place<scalar_t>(grad_k, *order_k);
  });
  return {mask[0] ? grad_q : skipped_gradient(sq), mask[1] ? grad_k : skipped_gradient(sk)};
}

std::tuple<at::Tensor, at::Tensor> emd_pair_backward_cpu(const at::Tensor& grad,
                                                         const at::Tensor& sq_in,
                                                         const at::Tensor& sk_in,
                                                         OutputMask output_mask) {
  const char* op = "rcl_ops::emd_pair_backward";
  check_pair(sq_in, sk_in, op);
  return run_emd_backward(grad, sq_in.contiguous(), sk_in.contiguous(), nullptr, nullptr,
                          output_mask, op);
}

std::tuple<at::Tensor, at::Tensor> emd_exact_backward_cpu(
    const at::Tensor& grad, const at::Tensor& sq_in, const at::Tensor& order_q_in,
    const at::Tensor& sk_in, const at::Tensor& order_k_in, OutputMask output_mask) {
  const char* op = "rcl_ops::emd_exact_backward";
  check_sorted_pair_and_orders(sq_in, order_q_in, sk_in, order_k_in, op);
  const at::Tensor order_q = order_q_in.contiguous(), order_k = order_k_in.contiguous();
  return run_emd_backward(grad, sq_in.contiguous(), sk_in.contiguous(), &order_q, &order_k,
                          output_mask, op);
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
