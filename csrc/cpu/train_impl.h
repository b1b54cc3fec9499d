// TrainStep's per-step kernels on the CPU.  Included by kernels_impl.h inside namespace scorefast_cpu
// (it uses kTile, tile_sumsq, add_tile_partials, Counter, noise_rows, for_each_block, fill_noise and
// fused_update).
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

// The DSM perturbation of a VP or sub-VP SDE in one call (TrainStep's loss and dsm_loss on the cpu
// backend), what scorefast/losses.py's _perturb computes with torch ops:
//   u   = the uniforms of (seed, step, ids, times_stream), element 0 (fill_noise);
//   t   = u * span + eps                                  (span = T - eps, float64);
//   l   = -0.25 t^2 beta_d - 0.5 t beta_0                 (VPSDE.log_mean_coeff, beta_d = beta_1 - beta_0);
//   mean = exp(l), std = sqrt(-expm1(2 l)) (VP) or -expm1(2 l) (sub-VP), rounded to float32;
//   x_t = mean x + std z, z the normals of (seed, step, ids, noise_stream) (fused_update).
// Each product and sum rounds once as the torch formula's ops do (volatile: no contraction into an
// fma); exp and expm1 are libm's (torch's vector loops use Sleef's: the float64 values may differ in
// their last bit, the float32 coefficients only where that bit decides a rounding tie).  Writes
// t_out (float64 [B]), coefs (float32 [2, B]: mean, std) and x_t (float32 [B, D]).
void dsm_perturb_vp(at::Tensor t_out, at::Tensor coefs, at::Tensor x_t, const at::Tensor& x, const at::Tensor& ids,
                    uint64_t seed, int64_t step, bool sub_vp, double beta_0, double beta_d, double eps, double span,
                    int64_t times_stream, int64_t noise_stream, int64_t uniform_kind) {
  const int64_t B = x.size(0);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 [B, D] CPU tensor");
  TORCH_CHECK(t_out.scalar_type() == at::kDouble && t_out.is_contiguous() && t_out.numel() == B,
              "t_out must be a contiguous float64 [B] tensor");
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.is_contiguous() && coefs.dim() == 2 && coefs.size(0) == 2 &&
                  coefs.size(1) == B,
              "coefs must be a contiguous float32 [2, B] tensor");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == B, "ids must be int64 [B]");
  TORCH_CHECK(t_out.device().is_cpu() && coefs.device().is_cpu() && x_t.device().is_cpu() && ids.device().is_cpu(),
              "t_out, coefs, x_t, ids must be CPU tensors");
  at::Tensor u = at::empty({B, 1}, x.options());
  fill_noise(u, ids, seed, step, times_stream, 0, uniform_kind);
  const float* up = u.data_ptr<float>();
  double* tp = t_out.data_ptr<double>();
  float* mean_out = coefs.data_ptr<float>();
  float* std_out = mean_out + B;
  for (int64_t b = 0; b < B; ++b) {
    const volatile double scaled = static_cast<double>(up[b]) * span;
    const double t = scaled + eps;
    const volatile double t2 = t * t;
    const volatile double p1 = (-0.25 * t2) * beta_d;
    const volatile double p2 = (0.5 * t) * beta_0;
    const double l = p1 - p2;
    const double e = std::expm1(2.0 * l);
    tp[b] = t;
    mean_out[b] = static_cast<float>(std::exp(l));
    std_out[b] = static_cast<float>(sub_vp ? -e : std::sqrt(-e));
  }
  fused_update(x_t, x, {}, coefs, ids, seed, step, noise_stream, true);
}

// TrainStep's residual for an eps-prediction network's DSM in one pass over out [B, D] (float32):
// r = z - out with z the normals of (seed, step, ids, stream) (one rounding: fused_update's with the
// coefficients (-1, 1)), sq [B] = its per-sample sums of squares in sumsq_norms' tiles and order, and
// g = r * coef (float32, the gradient the step backpropagates from out; torch's r.mul(coef)).  r
// itself is never stored.
void eps_dsm_residual(at::Tensor g, at::Tensor sq, const at::Tensor& out, const at::Tensor& ids, uint64_t seed,
                      int64_t step, int64_t stream, double coef) {
  const int64_t B = out.size(0), D = out.dim() == 2 ? out.size(1) : 0;
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous(),
              "out must be a contiguous float32 [B, D] CPU tensor");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.sizes() == out.sizes(),
              "g must be a contiguous float32 tensor of out's shape");
  TORCH_CHECK(sq.scalar_type() == at::kFloat && sq.is_contiguous() && sq.numel() == B, "sq must be float32 [B]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == B, "ids must be int64 [B]");
  TORCH_CHECK(g.device().is_cpu() && sq.device().is_cpu() && ids.device().is_cpu(), "g, sq, ids must be CPU tensors");
  TORCH_CHECK(std::fabs(coef) <= std::numeric_limits<float>::max(), "coef must be a finite float32 number");
  const int64_t tiles = (D + kTile - 1) / kTile;
  std::vector<float> partial(static_cast<size_t>(B * tiles), 0.0f);
  const Counter c{seed, static_cast<uint32_t>(step), static_cast<uint32_t>(stream)};
  const float cf = static_cast<float>(coef);
  const float* op = out.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  const int64_t* id = ids.data_ptr<int64_t>();
  for_each_block(B, D, 0, [&](int64_t b0, int64_t nb, int64_t first, int64_t n) {
    alignas(64) std::array<float, kTile> zbuf, r;
    noise_rows(c, id, b0, nb, first, n, kNormal, zbuf.data(), n);
    for (int64_t b = b0; b < b0 + nb; ++b) {
      const float* zv = zbuf.data() + (b - b0) * n;
      const float* ov = op + b * D + first;
      float* gv = gp + b * D + first;
      for (int64_t i = 0; i < n; ++i) r[i] = zv[i] - ov[i];
      partial[b * tiles + first / kTile] = tile_sumsq(r.data(), n);
      for (int64_t i = 0; i < n; ++i) gv[i] = r[i] * cf;
    }
  });
  add_tile_partials(partial, B, tiles, sq.data_ptr<float>());
}
