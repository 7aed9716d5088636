// Operator schemas of the rcl_ops library. Kernels attach per device in csrc/cpu and
// csrc/cuda; fake (meta) kernels are registered from Python (rcl_ops/_native.py), autograd
// of the fused ops (emd_exact, mmd_grid, mmd_direct, bd, info_nce) in C++ (csrc/autograd.cpp), of
// the primitives from Python (rcl_ops/_autograd.py).
#include <Python.h>
#include <torch/library.h>

// Importing rcl_ops._C loads this library and runs the registrations below; the module
// itself is empty (the ops live in torch.ops.rcl_ops).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// Backward ops take output_mask: which of the two input sides (q, k; or x, y) need a
// gradient. A side that does not is skipped where that saves work and returned as a
// 0-element tensor (autograd passes None/undefined for it).
TORCH_LIBRARY(rcl_ops, m) {
  // Bhattacharyya: per-row mean and unbiased variance, then the closed-form pair term.
  m.def("moments(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("moments_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor mean) -> Tensor");
  m.def("bd_pair(Tensor mean_q, Tensor var_q, Tensor mean_k, Tensor var_k, float eps) -> Tensor");
  m.def(
      "bd_pair_backward(Tensor grad, Tensor mean_q, Tensor var_q, Tensor mean_k, Tensor var_k, "
      "float eps, bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // The whole Bhattacharyya distance as one node (one autograd hop per loss step).
  m.def(
      "bd(Tensor q, Tensor k, float eps) -> (Tensor distances, Tensor mean_q, Tensor var_q, "
      "Tensor mean_k, Tensor var_k)");
  m.def(
      "bd_backward(Tensor grad, Tensor q, Tensor k, Tensor mean_q, Tensor var_q, Tensor mean_k, "
      "Tensor var_k, float eps, bool[2] output_mask) -> (Tensor, Tensor)");
  // EMD: per-row sorted values or K mid-level quantiles (with the sort order), then the
  // pairwise mean absolute difference.
  m.def("sorted_quantiles(Tensor x, int num_quantiles) -> (Tensor quantiles, Tensor order)");
  m.def("sorted_quantiles_backward(Tensor grad_quantiles, Tensor order) -> Tensor");
  m.def("emd_pair(Tensor sorted_q, Tensor sorted_k) -> Tensor");
  m.def(
      "emd_pair_backward(Tensor grad, Tensor sorted_q, Tensor sorted_k, bool[2] output_mask) -> "
      "(Tensor, Tensor)");
  // Exact EMD (K == M) as one node, so that its backward can fuse the scatter back.
  m.def(
      "emd_exact(Tensor q, Tensor k) -> (Tensor distances, Tensor sorted_q, Tensor order_q, "
      "Tensor sorted_k, Tensor order_k)");
  m.def(
      "emd_exact_backward(Tensor grad, Tensor sorted_q, Tensor order_q, Tensor sorted_k, "
      "Tensor order_k, bool[2] output_mask) -> (Tensor, Tensor)");
  // MMD: binned-grid method (linear in M) and the exact direct kernel sums.
  // The forward also returns its grid (lo, step as a float64 (2,) tensor) and the float64
  // (B, num_bins) binned weights of q and k, which the backward reuses instead of binning again.
  m.def(
      "mmd_grid(Tensor q, Tensor k, Tensor bandwidths, int num_bins, bool unbiased) -> "
      "(Tensor distances, Tensor grid, Tensor w_q, Tensor w_k)");
  m.def(
      "mmd_grid_backward(Tensor grad, Tensor q, Tensor k, Tensor bandwidths, Tensor grid, "
      "Tensor w_q, Tensor w_k, int num_bins, bool unbiased, bool[2] output_mask) -> (Tensor, "
      "Tensor)");
  m.def("gaussian_kernel_sums(Tensor x, Tensor y, Tensor bandwidths, bool paired) -> Tensor");
  m.def(
      "gaussian_kernel_sums_backward(Tensor grad, Tensor x, Tensor y, Tensor bandwidths, "
      "bool paired, bool[2] output_mask) -> (Tensor, Tensor)");
  // The exact MMD as one node: the three kernel sums and their V or U statistic. bandwidths
  // None: the pooled standard deviation of all values of q and k (1 where it is 0). Returns the
  // float64 bandwidths used and the float64 statistic before the V-statistic's clamp at 0,
  // which the backward reads. derivatives=True (CPU only) also returns the sums of the kernel's
  // derivative k'(x - y) that the backward contracts with grad, so that it evaluates no kernel:
  // one float64 vector of Bq Bk M + Bq Bk N + Bq M + Bk N values, the (Bq, Bk, M) sums over t
  // of k'(q[i, s] - k[j, t]), the (Bq, Bk, N) sums over s of the same, and the (Bq, M) and
  // (Bk, N) sums over t of k'(q[i, s] - q[i, t]) and k'(k[j, t] - k[j, u]); else 0 values.
  m.def(
      "mmd_direct(Tensor q, Tensor k, Tensor? bandwidths, bool unbiased, bool derivatives) -> "
      "(Tensor distances, Tensor bandwidths, Tensor statistic, Tensor derivative_sums)");
  m.def(
      "mmd_direct_backward(Tensor grad, Tensor q, Tensor k, Tensor bandwidths, Tensor statistic, "
      "Tensor derivative_sums, bool unbiased, bool[2] output_mask) -> (Tensor, Tensor)");
  // The InfoNCE loss of a (Bq, Bk) distance matrix with its derivative computed in the forward
  // (logits -D / temperature, row i's target column first_positive + i): losses (Bq,) per query
  // (symmetric: the mean of row i's and column i's losses), grad_rows (Bq, Bk) = d losses[i] /
  // d D[i, :] in row i, and where symmetric grad_columns (Bq, Bk) = d losses[j] / d D[:, j] (the
  // column part) in column j, else 0 elements. The backward is grad[i] grad_rows[i, j] +
  // grad[j] grad_columns[i, j] (csrc/autograd.cpp).
  m.def(
      "info_nce(Tensor distances, float temperature, bool symmetric, int first_positive) -> "
      "(Tensor losses, Tensor grad_rows, Tensor grad_columns)");
  // The MMD's default bandwidth (rcl_ops.ops.default_bandwidth): the standard deviation of all
  // values of q and k pooled, float64 (1,), 1 where every value is equal; two passes in float64
  // (the mean, then the squared deviations), in a fixed order (deterministic). No autograd: the
  // bandwidth is a constant of the distance.
  m.def("pooled_std(Tensor q, Tensor k) -> Tensor");
}
