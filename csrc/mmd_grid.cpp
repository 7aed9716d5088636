// Binned-grid MMD (see mmd_grid.h). With w_i the binned weights of residual i and K the
// Gaussian kernel sampled on the grid, MMD^2_V[i, j] = (w_i - w_j)^T K (w_i - w_j). All
// weights are first centred on their batch mean (the differences are unchanged), so the
// float64 Gram terms stay small when MMD^2 is tiny next to w^T K w. K is applied as a
// linear convolution by FFT, so the cost does not depend on the bandwidth.
#include "mmd_grid.h"

#include "checks.h"
#include "rcl_ops/math.h"

namespace rcl_ops {
namespace {

struct Grid {
  at::Tensor lo, step;  // 0-dim float64 views of the (2,) grid tensor [lo, step]
  int64_t num_bins;
  int64_t fft_size;  // >= 2 G - 1, so the circular convolution is a linear one
};

constexpr int64_t kMaxNumBins = int64_t(1) << 24;  // as rcl_ops.ops.MAX_NUM_BINS

int64_t fft_size_for(int64_t num_bins) {
  int64_t fft_size = 1;
  while (fft_size < 2 * num_bins) fft_size *= 2;
  return fft_size;
}

Grid grid_from_tensor(const at::Tensor& grid, int64_t num_bins) {
  return {grid.select(0, 0), grid.select(0, 1), num_bins, fft_size_for(num_bins)};
}

// (B, G) -> (B, G): out[:, m] = sum_g w[:, g] kernel((m - g) step).
at::Tensor convolve(const at::Tensor& w, const at::Tensor& spectrum, const Grid& grid) {
  const at::Tensor product = at::fft_rfft(w, grid.fft_size, -1) * spectrum;
  return at::fft_irfft(product, grid.fft_size, -1).narrow(-1, 0, grid.num_bins);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
                  int64_t num_bins, bool unbiased, const char* op) {
  check_rows(q, op, "q");
  check_rows(k, op, "k");
  check_same(q, k, op, "q", "k");
  TORCH_CHECK(bandwidths.dim() == 1 && bandwidths.numel() > 0, op,
              ": bandwidths must be a non-empty 1-D tensor, got shape ", bandwidths.sizes());
  TORCH_CHECK(bandwidths.device() == q.device(), op, ": bandwidths is on ", bandwidths.device(),
              " but q is on ", q.device());
  // The bound keeps the FFT size's doubling loop (and the kernels' indices) from overflowing.
  TORCH_CHECK(num_bins >= 2 && num_bins <= kMaxNumBins, op, ": num_bins must be in [2, ",
              kMaxNumBins, "], got ", num_bins);
  TORCH_CHECK(q.size(1) <= kMaxGridValues && k.size(1) <= kMaxGridValues, op, ": at most ",
              kMaxGridValues, " values per row fit the fixed-point binning, got ",
              std::max(q.size(1), k.size(1)));
  TORCH_CHECK(!unbiased || (q.size(1) > 1 && k.size(1) > 1), op,
              ": the unbiased estimator needs at least 2 values per residual");
}

// The forward's saved state: its grid [lo, step] and the binned weights of q and k.
void check_saved_grid(const at::Tensor& grid, const at::Tensor& w_q, const at::Tensor& w_k,
                      const at::Tensor& q, const at::Tensor& k, int64_t num_bins, const char* op) {
  TORCH_CHECK(grid.dim() == 1 && grid.size(0) == 2 && grid.scalar_type() == at::kDouble &&
                  grid.device() == q.device(),
              op, ": grid must be the forward's float64 [lo, step] on ", q.device());
  const auto check_weights = [&](const at::Tensor& w, const at::Tensor& x, const char* name) {
    TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(0) && w.size(1) == num_bins &&
                    w.scalar_type() == at::kDouble && w.device() == x.device(),
                op, ": ", name, " must be the forward's float64 binned weights of shape (",
                x.size(0), ", ", num_bins, "), got ", w.scalar_type(), " ", w.sizes());
  };
  check_weights(w_q, q, "w_q");
  check_weights(w_k, k, "w_k");
}

}  // namespace

// The grid spans [min, max] of all values of q and k (at least 1e-3 of the smallest
// bandwidth, so that a batch of identical values still has a valid step).
at::Tensor grid_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bandwidths,
                     int64_t num_bins) {
  const at::Tensor lo = at::minimum(q.min(), k.min()).to(at::kDouble);
  const at::Tensor hi = at::maximum(q.max(), k.max()).to(at::kDouble);
  const at::Tensor span = at::maximum(hi - lo, 1e-3 * bandwidths.min().to(at::kDouble));
  return at::stack({lo, span / double(num_bins - 1)});
}

at::Tensor spectrum_aten(const at::Tensor& grid, const at::Tensor& bandwidths, int64_t fft_size,
                         bool derivative) {
  const auto opts = grid.options();
  at::Tensor n = at::arange(fft_size, opts);
  n = at::where(n < double(fft_size / 2), n, n - double(fft_size));
  const at::Tensor diff = (n * grid.select(0, 1)).unsqueeze(1);             // (L, 1)
  const at::Tensor inv_two_h2 = 0.5 / bandwidths.to(at::kDouble).square();  // (H,)
  at::Tensor values = at::exp(-diff.square() * inv_two_h2);
  if (derivative) values = values * (-2.0 * diff * inv_two_h2);
  return at::fft_rfft(values.sum(1), fft_size);
}

MmdGridOutputs mmd_grid_forward(const GridKernels& kernels, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& bandwidths, int64_t num_bins,
                                bool unbiased) {
  check_inputs(q, k, bandwidths, num_bins, unbiased, "rcl_ops::mmd_grid");
  const at::Tensor grid_tensor = kernels.grid(q, k, bandwidths, num_bins);
  const Grid grid = grid_from_tensor(grid_tensor, num_bins);
  const at::Tensor w_q = kernels.bin(q, grid.lo, grid.step, num_bins);
  const at::Tensor w_k = kernels.bin(k, grid.lo, grid.step, num_bins);
  const at::Tensor w_mean = (w_q.sum(0) + w_k.sum(0)) / double(q.size(0) + k.size(0));
  const at::Tensor u_q = w_q - w_mean, u_k = w_k - w_mean;
  const at::Tensor spectrum =
      kernels.spectrum(grid_tensor, bandwidths, grid.fft_size, /*derivative=*/false);
  const at::Tensor v_q = convolve(u_q, spectrum, grid), v_k = convolve(u_k, spectrum, grid);
  const at::Tensor self_q = (u_q * v_q).sum(1), self_k = (u_k * v_k).sum(1);
  at::Tensor out = self_q.unsqueeze(1) + self_k.unsqueeze(0) - 2.0 * at::mm(u_q, v_k.t());
  if (unbiased) {
    // U-statistic: drop the diagonal k(x, x) = H of each self sum, w^T K w (uncentred).
    const at::Tensor v_mean = convolve(w_mean.unsqueeze(0), spectrum, grid).squeeze(0);
    const at::Tensor mean_self = (w_mean * v_mean).sum();
    const double num_h = double(bandwidths.numel());
    const at::Tensor full_q = self_q + 2.0 * (u_q * v_mean).sum(1) + mean_self;
    const at::Tensor full_k = self_k + 2.0 * (u_k * v_mean).sum(1) + mean_self;
    out = out + ((full_q - num_h) / double(q.size(1) - 1)).unsqueeze(1) +
          ((full_k - num_h) / double(k.size(1) - 1)).unsqueeze(0);
  }
  return {out.to(q.scalar_type()), grid_tensor, w_q, w_k};
}

std::tuple<at::Tensor, at::Tensor> mmd_grid_backward(
    const GridKernels& kernels, const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& bandwidths, const at::Tensor& grid_tensor, const at::Tensor& w_q,
    const at::Tensor& w_k, int64_t num_bins, bool unbiased, OutputMask output_mask) {
  const char* op = "rcl_ops::mmd_grid_backward";
  check_inputs(q, k, bandwidths, num_bins, unbiased, op);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == q.size(0) && grad.size(1) == k.size(0), op,
              ": grad must have shape (", q.size(0), ", ", k.size(0), "), got ", grad.sizes());
  check_saved_grid(grid_tensor, w_q, w_k, q, k, num_bins, op);
  const Grid grid = grid_from_tensor(grid_tensor, num_bins);
  const at::Tensor w_mean = (w_q.sum(0) + w_k.sum(0)) / double(q.size(0) + k.size(0));
  const at::Tensor u_q = w_q - w_mean, u_k = w_k - w_mean;
  const at::Tensor g = grad.to(at::kDouble);
  const at::Tensor row_sums = g.sum(1), col_sums = g.sum(0);
  // dD[i, j]/dx = (2 / M) (K' * (w_i - w_j))(x) for x in q[i]; summed over j with weights
  // grad[i, j], the field of q[i] is K' * (rowsum_i w_i - (grad w_k)_i). Centring is free:
  // the w_mean terms cancel.
  const at::Tensor spectrum =
      kernels.spectrum(grid_tensor, bandwidths, grid.fft_size, /*derivative=*/true);
  // One side: its coefficients (sums of grad against both batches' weights), convolved with
  // the kernel derivative into a field, interpolated at its values.
  const auto side_gradient = [&](const at::Tensor& x, const at::Tensor& w_x, const at::Tensor& u_x,
                                 const at::Tensor& u_other, const at::Tensor& g_x,
                                 const at::Tensor& sums) {
    at::Tensor coef = sums.unsqueeze(1) * u_x - at::mm(g_x, u_other);
    if (unbiased) coef = coef + (sums / double(x.size(1) - 1)).unsqueeze(1) * w_x;
    const at::Tensor field = convolve(coef, spectrum, grid) * (2.0 / double(x.size(1)));
    return kernels.interpolate(field, x, grid.lo, grid.step);
  };
  return {output_mask[0] ? side_gradient(q, w_q, u_q, u_k, g, row_sums) : skipped_gradient(q),
          output_mask[1] ? side_gradient(k, w_k, u_k, u_q, g.t(), col_sums) : skipped_gradient(k)};
}

}  // namespace rcl_ops
