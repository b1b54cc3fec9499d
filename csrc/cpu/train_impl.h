// TrainStep's per-step kernels on the CPU.  Included by kernels_impl.h inside namespace scorefast_cpu
// (it uses kTile and tile_sumsq).
#pragma once

// clip_grad_norm_ in one call over the gradients of one (device, dtype) group: contiguous float32
// tensors.  Each tensor's sum of squares is its kTile tiles' float32 tree sums (tile_sumsq) added in
// float64 in tile order; its norm is the float32 of the float64 root, the total the float32 of the
// float64 root of the sum of the norms' squares (torch.linalg.vector_norm of the stacked norms, with
// more precision); the coefficient min(1, max_norm / (total + 1e-6)) is torch's float32 arithmetic
// (reciprocal, times max_norm, clamp), and every gradient is multiplied by it in place (as
// torch._foreach_mul_).  Returns the total (0-d float32).  One pass to sum, one to scale; the
// result does not depend on the number of threads.
at::Tensor clip_grad_norm(std::vector<at::Tensor> grads, double max_norm) {
  double total_sq = 0.0;
  for (const auto& g : grads) {
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.device().is_cpu(),
                "grads must be contiguous float32 CPU tensors");
    const float* p = g.data_ptr<float>();
    const int64_t n = g.numel();
    double sq = 0.0;
    for (int64_t i = 0; i < n; i += kTile) sq += static_cast<double>(tile_sumsq(p + i, std::min(kTile, n - i)));
    const double norm = static_cast<double>(static_cast<float>(std::sqrt(sq)));
    total_sq += norm * norm;
  }
  const float total = static_cast<float>(std::sqrt(total_sq));
  const volatile float shifted = total + 1e-6f;  // the reference's separate roundings (no fma)
  const volatile float recip = 1.0f / shifted;
  const float scaled = recip * static_cast<float>(max_norm);
  const float coef = scaled > 1.0f ? 1.0f : scaled;  // clamp(max=1): NaN stays NaN
  if (coef != 1.0f) {
    const Vec c(coef);
    for (auto& g : grads) {
      float* p = g.data_ptr<float>();
      const int64_t n = g.numel();
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(p + i) * c).store(p + i);
      for (; i < n; ++i) p[i] = p[i] * coef;
    }
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kFloat));
}
