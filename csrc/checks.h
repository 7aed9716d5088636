// Argument checks shared by the CPU and CUDA kernels; messages name the op and argument.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace rcl_ops {

// Which input sides of a backward op need their gradient (the schema's bool[2] output_mask).
using OutputMask = std::array<bool, 2>;

// The placeholder a backward op returns for a side nobody needs: 0 elements, like's options.
inline at::Tensor skipped_gradient(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

inline void check_rows(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (B, M), got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0, op, ": ", name, " must be non-empty, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", x.scalar_type());
}

// q and k of one distance: the same number of values per row, dtype and device.
inline void check_same_rows(const at::Tensor& q, const at::Tensor& k, const char* op) {
  TORCH_CHECK(
      q.size(1) == k.size(1) && q.scalar_type() == k.scalar_type() && q.device() == k.device(), op,
      ": q and k must have the same number of values, dtype and device, got ", q.sizes(), " ",
      q.scalar_type(), " ", q.device(), " and ", k.sizes(), " ", k.scalar_type(), " ", k.device());
}

inline void check_vector(const at::Tensor& x, int64_t size, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == size, op, ": ", name, " must have shape (", size,
              "), got ", x.sizes());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(),
              " but ", name_b, " is ", b.scalar_type());
}

// Two sorted (or quantile) batches to pair: (Bq, K) and (Bk, K).
inline void check_pair(const at::Tensor& sq, const at::Tensor& sk, const char* op) {
  check_rows(sq, op, "sorted_q");
  check_rows(sk, op, "sorted_k");
  check_same(sq, sk, op, "sorted_q", "sorted_k");
  TORCH_CHECK(sq.size(1) == sk.size(1), op, ": sorted_q and sorted_k must have the same K, got ",
              sq.size(1), " and ", sk.size(1));
}

// Sort orders are int32 on every device (rows hold at most 2^31 - 1 values): half the
// memory of int64 for the (B, M) orders that autograd keeps between forward and backward.
using order_t = int32_t;
constexpr auto kOrderType = at::kInt;

// A sort order (int32, the shape of the sorted values, on their device).
inline void check_order(const at::Tensor& order, const at::Tensor& sorted, const char* op,
                        const char* name) {
  TORCH_CHECK(order.scalar_type() == kOrderType && order.sizes() == sorted.sizes() &&
                  order.device() == sorted.device(),
              op, ": ", name, " must be int32 of shape ", sorted.sizes(), " on ", sorted.device(),
              ", got ", order.scalar_type(), " ", order.sizes(), " on ", order.device());
}

// The saved state of the exact EMD: both batches' sorted values and their sort orders.
inline void check_sorted_pair_and_orders(const at::Tensor& sorted_q, const at::Tensor& order_q,
                                         const at::Tensor& sorted_k, const at::Tensor& order_k,
                                         const char* op) {
  check_pair(sorted_q, sorted_k, op);
  check_order(order_q, sorted_q, op, "order_q");
  check_order(order_k, sorted_k, op, "order_k");
}

// The sort order (B, M) int32 that a (B, K) quantile gradient is scattered through.
inline void check_quantile_order(const at::Tensor& order, const at::Tensor& grad, const char* op) {
  TORCH_CHECK(
      order.dim() == 2 && order.size(0) == grad.size(0) && order.scalar_type() == kOrderType, op,
      ": order must be int32 of shape (", grad.size(0), ", M), got ", order.scalar_type(), " ",
      order.sizes());
}

// The two row batches and the bandwidths of the direct Gaussian kernel sums (paired: row i
// of x with row i of y only). Positivity of the bandwidths is checked where it costs no
// host synchronisation (CPU).
inline void check_kernel_sum_args(const at::Tensor& x, const at::Tensor& y,
                                  const at::Tensor& bandwidths, bool paired, const char* op) {
  check_rows(x, op, "x");
  check_rows(y, op, "y");
  check_same(x, y, op, "x", "y");
  TORCH_CHECK(bandwidths.dim() == 1 && bandwidths.numel() > 0, op,
              ": bandwidths must be a non-empty 1-D tensor");
  TORCH_CHECK(!paired || x.size(0) == y.size(0), op, ": paired sums need equal batch sizes, got ",
              x.size(0), " and ", y.size(0));
}

// Means and variances of the q and k batches for the Bhattacharyya pair term: float64 for
// every input dtype (the variance of float32 values overflows float32 where BD does not).
inline void check_bd_moments(const at::Tensor& mean_q, const at::Tensor& var_q,
                             const at::Tensor& mean_k, const at::Tensor& var_k, const char* op) {
  TORCH_CHECK(mean_q.dim() == 1 && mean_k.dim() == 1, op, ": means must be 1-D");
  TORCH_CHECK(mean_q.scalar_type() == at::kDouble, op, ": the moments must be float64, got ",
              mean_q.scalar_type());
  check_vector(var_q, mean_q.size(0), op, "var_q");
  check_vector(var_k, mean_k.size(0), op, "var_k");
  check_same(mean_q, mean_k, op, "mean_q", "mean_k");
  check_same(mean_q, var_q, op, "mean_q", "var_q");
  check_same(mean_q, var_k, op, "mean_q", "var_k");
}

// The two residual batches of the fused Bhattacharyya op (the sample variance needs M >= 2).
inline void check_bd_inputs(const at::Tensor& q, const at::Tensor& k, const char* op) {
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  check_same(q, k, op, "q", "k");
  TORCH_CHECK(q.size(1) > 1 && k.size(1) > 1, op,
              ": the sample variance needs at least 2 values per residual");
}

// The fused Bhattacharyya backward's saved state: both batches and their moments.
inline void check_bd_saved(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mean_q,
                           const at::Tensor& var_q, const at::Tensor& mean_k,
                           const at::Tensor& var_k, const char* op) {
  check_bd_inputs(q, k, op);
  check_bd_moments(mean_q, var_q, mean_k, var_k, op);
  check_vector(mean_q, q.size(0), op, "mean_q");
  check_vector(mean_k, k.size(0), op, "mean_k");
  TORCH_CHECK(mean_q.device() == q.device(), op, ": mean_q is on ", mean_q.device(),
              " but q is on ", q.device());
}

}  // namespace rcl_ops
